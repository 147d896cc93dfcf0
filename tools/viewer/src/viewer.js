// InteriorFusion's scene viewer: one or several .glb scenes side by side with one linked orbit camera, a toggle
// between per-voxel semantic colours and PBR materials, and each pane's condition camera as a frustum carrying its
// input image. Bundled by esbuild (package.json) and inlined by interiorfusion_core.viewer.viewer_html together
// with the scenes, so the page needs no network (it runs inside MLflow's artifact iframe).
//
// Page contract (written by viewer_html): <script type="application/json" id="interiorfusion-scenes"> holding
//   {title, mode: "semantic"|"pbr", hidden: [class names hidden at start, e.g. "ceiling"], palette: {class name: "#rrggbb"}, panes: [{label, glb (base64), metrics,
//    camera: {cam_to_world (16 numbers, row-major, glTF y-up world, OpenGL axes), fov_deg, aspect, image}}]}
// Scenes written by interiorfusion_core.viewer.voxel_glb have two top-level nodes, "semantic" and "pbr", and the
// toggle shows one of them; any other .glb is recoloured by mesh name from the palette in semantic mode.
// The page's URL hash can set the start: #mode=pbr&frustum=0&hidden=ceiling,wall. window.interiorfusionViewer is the page's handle
// (tests read `ready`, `frames` and call setMode).

import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";
import { GLTFLoader } from "three/addons/loaders/GLTFLoader.js";
import { RoomEnvironment } from "three/addons/environments/RoomEnvironment.js";

const BACKGROUND = 0x1b1d22;
const FALLBACK_COLOR = 0x9a9a9a;

function readPage() {
  const node = document.getElementById("interiorfusion-scenes");
  if (!node) throw new Error("no #interiorfusion-scenes data on the page");
  return JSON.parse(node.textContent);
}

function hashOptions() {
  const params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
  return { mode: params.get("mode"), frustum: params.get("frustum"), hidden: params.get("hidden") };
}

function base64ToBuffer(text) {
  const bytes = atob(text);
  const out = new Uint8Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) out[i] = bytes.charCodeAt(i);
  return out.buffer;
}

// A node's class: voxel_glb writes it as extras.class (GLTFLoader's userData); other files name nodes after
// their classes, which GLTFLoader makes unique with a numeric suffix.
function className(o) {
  return o.userData?.class ?? o.name.replace(/_\d+$/, "");
}

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

// The condition camera: a wireframe pyramid from its centre to an image plane showing the input image.
function frustum(camera, depth) {
  const group = new THREE.Group();
  group.name = "condition-camera";
  const halfH = depth * Math.tan(THREE.MathUtils.degToRad(camera.fov_deg) / 2);
  const halfW = halfH * camera.aspect;
  const corners = [[-halfW, -halfH], [halfW, -halfH], [halfW, halfH], [-halfW, halfH]].map(
    ([x, y]) => new THREE.Vector3(x, y, -depth));
  const points = [];
  for (const c of corners) points.push(new THREE.Vector3(0, 0, 0), c);
  for (let i = 0; i < 4; i++) points.push(corners[i], corners[(i + 1) % 4]);
  const lines = new THREE.LineSegments(new THREE.BufferGeometry().setFromPoints(points),
    new THREE.LineBasicMaterial({ color: 0xffd166 }));
  group.add(lines);
  if (camera.image) {
    const texture = new THREE.TextureLoader().load(camera.image, () => window.interiorfusionViewer?.render());
    texture.colorSpace = THREE.SRGBColorSpace;
    const plane = new THREE.Mesh(new THREE.PlaneGeometry(2 * halfW, 2 * halfH),
      new THREE.MeshBasicMaterial({ map: texture, side: THREE.DoubleSide, transparent: true, opacity: 0.9 }));
    plane.position.set(0, 0, -depth);
    group.add(plane);
  }
  const m = new THREE.Matrix4().set(...camera.cam_to_world);
  group.applyMatrix4(m);
  return group;
}

// Semantic / PBR switch for one loaded scene, and whether its PBR view has materials of its own.
function modeSwitch(root, palette) {
  const semantic = root.getObjectByName("semantic");
  const pbr = root.getObjectByName("pbr");
  if (semantic && pbr) {
    const set = (mode) => { semantic.visible = mode === "semantic"; pbr.visible = mode !== "semantic"; };
    return [set, pbr.userData?.materials !== false];
  }
  // Any other .glb: class colours by mesh (or parent node) name, its own materials for PBR.
  const meshes = [];
  root.traverse((o) => { if (o.isMesh) meshes.push(o); });
  const flat = new Map();
  const classMaterial = (name) => {
    const hex = palette[name];
    const key = hex ?? "fallback";
    if (!flat.has(key)) {
      flat.set(key, new THREE.MeshStandardMaterial({
        color: hex ? new THREE.Color(hex) : FALLBACK_COLOR, roughness: 0.85, metalness: 0 }));
    }
    return flat.get(key);
  };
  const originals = meshes.map((m) => m.material);
  const semanticMaterials = meshes.map((m) => classMaterial(palette[className(m)] ? className(m) : className(m.parent)));
  return [(mode) => meshes.forEach((m, i) => { m.material = mode === "semantic" ? semanticMaterials[i] : originals[i]; }),
    true];
}

async function main() {
  const page = readPage();
  const options = hashOptions();
  const state = {
    mode: options.mode === "pbr" || options.mode === "semantic" ? options.mode : (page.mode || "semantic"),
    frustum: options.frustum !== "0",
    hidden: options.hidden !== null ? options.hidden.split(",").filter(Boolean) : (page.hidden || []),
    showHidden: false,
  };
  const started = performance.now();
  const timings = {};
  document.title = page.title || "InteriorFusion scenes";

  const app = el("div", { id: "app" });
  const bar = el("div", { id: "toolbar" });
  bar.append(el("span", { class: "title" }, page.title || ""));
  const modeButton = el("button", { id: "toggle-colors", type: "button" });
  const frustumButton = el("button", { id: "toggle-frustum", type: "button" });
  const hiddenButton = el("button", { id: "toggle-hidden", type: "button" });
  const resetButton = el("button", { id: "reset-view", type: "button" }, "Reset view");
  bar.append(modeButton, hiddenButton, frustumButton, resetButton);
  const stage = el("div", { id: "stage" });
  app.append(bar, stage);
  document.body.append(app);

  const renderer = new THREE.WebGLRenderer({ antialias: true, preserveDrawingBuffer: true });
  renderer.setPixelRatio(window.devicePixelRatio || 1);
  renderer.setScissorTest(true);
  renderer.toneMapping = THREE.ACESFilmicToneMapping;
  stage.append(renderer.domElement);
  const environment = new THREE.PMREMGenerator(renderer).fromScene(new RoomEnvironment(), 0.04).texture;
  timings.environment_ms = performance.now() - started;

  const loader = new GLTFLoader();
  const panes = [];
  const box = new THREE.Box3();
  for (const spec of page.panes) {
    const gltf = await loader.parseAsync(base64ToBuffer(spec.glb), "");
    timings.parse_ms = performance.now() - started;
    const scene = new THREE.Scene();
    scene.background = new THREE.Color(BACKGROUND);
    scene.environment = environment;
    scene.add(new THREE.HemisphereLight(0xffffff, 0x444444, 1.2));
    const sun = new THREE.DirectionalLight(0xffffff, 1.4);
    sun.position.set(3, 8, 5);
    scene.add(sun);
    scene.add(gltf.scene);
    gltf.scene.updateMatrixWorld(true);
    const sceneBox = new THREE.Box3().setFromObject(gltf.scene);
    box.union(sceneBox);
    const hideable = [];
    gltf.scene.traverse((o) => { if (o !== gltf.scene && state.hidden.includes(className(o))) hideable.push(o); });
    const [setMode, hasMaterials] = modeSwitch(gltf.scene, page.palette || {});
    const pane = { spec, scene, hideable, setMode, hasMaterials, frustum: null };
    if (spec.camera) {
      const size = sceneBox.getSize(new THREE.Vector3()).length() || 1;
      pane.frustum = frustum(spec.camera, 0.12 * size);
      scene.add(pane.frustum);
    }
    const label = el("div", { class: "pane-label" });
    label.append(el("div", { class: "name" }, spec.label || ""));
    for (const [k, v] of Object.entries(spec.metrics || {})) {
      label.append(el("div", { class: "metric" }, `${k} ${typeof v === "number" ? v.toPrecision(4) : v}`));
    }
    stage.append(label);
    pane.label = label;
    panes.push(pane);
  }

  // One camera and one set of controls for every pane: the panes' views stay linked.
  const camera = new THREE.PerspectiveCamera(45, 1, 0.01, 1000);
  const controls = new OrbitControls(camera, renderer.domElement);
  controls.enableDamping = false;
  const center = box.isEmpty() ? new THREE.Vector3() : box.getCenter(new THREE.Vector3());
  const radius = box.isEmpty() ? 1 : box.getSize(new THREE.Vector3()).length() / 2;
  const home = () => {
    // Far enough that the bounding sphere fits the narrower of the pane's two fields of view, seen from above
    // at an angle (rooms are open at the top once the ceiling is hidden).
    const halfV = THREE.MathUtils.degToRad(camera.fov) / 2;
    const halfH = Math.atan(Math.tan(halfV) * Math.max(0.2, camera.aspect));
    const distance = 1.05 * radius / Math.sin(Math.min(halfV, halfH));
    camera.position.copy(center).add(new THREE.Vector3(0.45, 1.2, 0.9).normalize().multiplyScalar(distance));
    camera.near = radius / 100;
    camera.far = radius * 20;
    controls.target.copy(center);
    controls.update();
  };

  const viewer = {
    ready: false,
    frames: 0,
    timings,
    get mode() { return state.mode; },
    panes,
    render() {
      const width = stage.clientWidth, height = stage.clientHeight;
      renderer.setSize(width, height, false);
      const paneWidth = width / Math.max(1, panes.length);
      camera.aspect = paneWidth / Math.max(1, height);
      camera.updateProjectionMatrix();
      panes.forEach((pane, i) => {
        const x = Math.round(i * paneWidth);
        renderer.setViewport(x, 0, Math.round(paneWidth), height);
        renderer.setScissor(x, 0, Math.round(paneWidth), height);
        renderer.render(pane.scene, camera);
        pane.label.style.left = `${x + 10}px`;
      });
      viewer.frames += 1;
    },
    setMode(mode, draw = true) {
      state.mode = mode;
      panes.forEach((p) => p.setMode(mode));
      modeButton.textContent = !viewer.hasMaterials ? "Semantic colours (these scenes have no materials)"
        : mode === "semantic" ? "Semantic colours (switch to PBR)" : "PBR materials (switch to semantic)";
      if (draw) viewer.render();
    },
    setShowHidden(show, draw = true) {
      state.showHidden = show;
      panes.forEach((p) => p.hideable.forEach((o) => { o.visible = show; }));
      hiddenButton.textContent = show ? `Hide ${state.hidden.join(", ")}` : `Show ${state.hidden.join(", ")}`;
      if (draw) viewer.render();
    },
    setFrustum(visible, draw = true) {
      state.frustum = visible;
      panes.forEach((p) => { if (p.frustum) p.frustum.visible = visible; });
      frustumButton.textContent = visible ? "Hide condition camera" : "Show condition camera";
      if (draw) viewer.render();
    },
  };
  window.interiorfusionViewer = viewer;
  frustumButton.hidden = !panes.some((p) => p.frustum);
  viewer.hasMaterials = panes.some((p) => p.hasMaterials);
  modeButton.disabled = !viewer.hasMaterials;
  hiddenButton.hidden = !panes.some((p) => p.hideable.length);
  hiddenButton.addEventListener("click", () => viewer.setShowHidden(!state.showHidden));
  modeButton.addEventListener("click", () => viewer.setMode(state.mode === "semantic" ? "pbr" : "semantic"));
  frustumButton.addEventListener("click", () => viewer.setFrustum(!state.frustum));
  resetButton.addEventListener("click", () => { home(); viewer.render(); });
  controls.addEventListener("change", () => viewer.render());
  window.addEventListener("resize", () => viewer.render());
  viewer.setShowHidden(false, false);
  viewer.setFrustum(state.frustum, false);
  viewer.setMode(state.mode, false);
  const t0 = performance.now();
  viewer.render();  // sizes the canvas (so home() sees the pane's aspect) and compiles the shaders
  timings.first_render_ms = performance.now() - t0;
  home();
  viewer.render();
  timings.ready_ms = performance.now() - started;
  viewer.ready = true;
  document.body.dataset.ready = "1";
}

main().catch((err) => {
  document.body.dataset.error = String(err && err.message ? err.message : err);
  const box = el("pre", { id: "viewer-error" }, `The viewer could not show these scenes: ${document.body.dataset.error}`);
  document.body.append(box);
});
