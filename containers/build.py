#!/usr/bin/env python3
"""Build the InteriorFusion container images: Debian base, wheelhouse, base image, one image per stage.

Runs with any Python 3.11+ that has pip (standard library only) and a Docker CLI whose daemon is reachable
(``DOCKER_HOST``; ``containers/dockerd.sh start`` gives a private one). Steps, each skipped when its inputs
did not change:

1. ``debian``     the runtime root file system ``interiorfusion/debian-python:bookworm`` made with
                  debootstrap and ``docker import`` (only without ``--base-image``; the rootfs tarball
                  is cached, so a fresh daemon re-imports it in seconds instead of re-running debootstrap).
2. ``project``    one wheel per project package (``pip wheel --no-deps``), rebuilt when its sources change.
3. ``wheelhouse`` every third-party wheel the images need, for the target Python, with torch pinned
                  by ``--torch-spec`` (default: the CPU-only build) and torchvision constrained to the build
                  paired with it (``torchvision_for``); skipped if requirements are unchanged.
4. ``contexts``   a small build context per image: the exact wheel closure (hard links into the wheelhouse),
                  pinned lock files and the project wheels. ``pip install --dry-run`` against the wheelhouse
                  with ``--no-index`` proves the closure installs offline before Docker runs.
5. ``images``     ``interiorfusion/base`` then ``interiorfusion/<stage>``; an image whose inputs digest (label
                  ``org.interiorfusion.inputs``) matches is not rebuilt at all, otherwise Docker's layer cache
                  does the rest.

``--online`` builds without a wheelhouse: the images install third-party packages from the index
(``--index-url``/``--extra-index-url``), only the project wheels come from the context.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONTAINERS = REPO / "containers"
IMAGE_TORCH_PIN = REPO / "requirements" / "torch-cpu-image.txt"


def image_torch_spec() -> str:
    """The CPU images' torch requirement, from its one pin file."""
    lines = [ln.strip() for ln in IMAGE_TORCH_PIN.read_text().splitlines()]
    specs = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(specs) != 1:
        raise SystemExit(f"{IMAGE_TORCH_PIN}: expected exactly one requirement line, found {len(specs)}")
    return specs[0]


DEFAULT_TORCH_SPEC = image_torch_spec()
# The development torch (a CUDA build that also runs on CPUs) and its torchvision, which install from local
# files on the team's build machines: the way out when the CPU image torch has no matching torchvision offline.
DEV_TORCH_PIN = REPO / "requirements" / "torch-cpu-dev.txt"

# torchvision is compiled against one torch release: beside any other (or beside a build of the same release
# with another accelerator: the PyPI wheel of 0.28.0 links libtorch_cuda, which torch 2.13.0+cpu lacks) its
# operators fail to register ("operator torchvision::nms does not exist"). torch 2.N pairs with torchvision
# 0.(N+15) (torchvision's own compatibility table), patch for patch, with one exception.
TORCHVISION_FOR_TORCH_MINOR = {f"2.{n}": f"0.{n + 15}" for n in range(15)}
TORCHVISION_PATCH_EXCEPTIONS = {"2.0.1": "0.15.2"}
EXACT_TORCH = re.compile(r"\s*torch\s*===?\s*(\d+)\.(\d+)\.(\d+)(\+[A-Za-z0-9.]+)?\s*")


def torchvision_for(torch_spec: str) -> str | None:
    """The torchvision requirement that matches ``torch_spec``, or None when the spec is not one exact release.

    The local label is carried over, so a CPU-only torch gets the CPU-only torchvision of the same index:
    ``torch==2.13.0+cpu`` -> ``torchvision==0.28.0+cpu``, ``torch==2.14.1`` -> ``torchvision==0.29.1``.
    """
    m = EXACT_TORCH.fullmatch(torch_spec)
    if not m:
        return None
    major, minor, patch, local = m.groups()
    version = f"{major}.{minor}.{patch}"
    paired_minor = TORCHVISION_FOR_TORCH_MINOR.get(f"{major}.{minor}")
    if paired_minor is None:
        return None
    return f"torchvision=={TORCHVISION_PATCH_EXCEPTIONS.get(version, f'{paired_minor}.{patch}')}{local or ''}"


def dev_torch_spec() -> str | None:
    """The development environment's torch pin (requirements/torch-cpu-dev.txt), if it pins one exactly."""
    if not DEV_TORCH_PIN.exists():
        return None
    for line in DEV_TORCH_PIN.read_text().splitlines():
        if EXACT_TORCH.fullmatch(line.split("#")[0]):
            return line.split("#")[0].strip()
    return None


def missing_torchvision_message(stages: list[str], torch_spec: str, pin: str, wheelhouse: Path) -> str:
    """The one sentence an offline build says when the torchvision its images need cannot be had."""
    alt = dev_torch_spec()
    if alt and alt != torch_spec and torchvision_for(alt):
        other = (
            f"pass --torch-spec '{alt}' (the development pin of {DEV_TORCH_PIN.relative_to(REPO)}, a CUDA build"
            f" that runs on CPUs too, paired with {torchvision_for(alt)})"
        )
    else:
        other = "pass a --torch-spec whose matching torchvision pip can reach"
    images = f"the {', '.join(stages)} image" + ("s need" if len(stages) > 1 else " needs")
    return (
        f"{images} torchvision, and the wheel that matches {torch_spec}, {pin}, is neither in the wheelhouse"
        f" ({wheelhouse}) nor on any index pip reaches from here: build online (--online; it comes from"
        f" --extra-index-url, the PyTorch CPU index by default) or {other}"
    )


DEBIAN_IMAGE = "interiorfusion/debian-python:bookworm"
DEBIAN_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
INPUTS_LABEL = "org.interiorfusion.inputs"
# Bump when the layout of contexts or the meaning of a stamp changes: invalidates every cached step.
LAYOUT_VERSION = "1"


def log(msg: str) -> None:
    print(f"[build] {msg}", file=sys.stderr, flush=True)


class BuildFailure(RuntimeError):
    """A step failed; the message says which and why."""


def run(cmd: list[str], *, env: dict[str, str] | None = None, capture: bool = False, **kw) -> str:
    shown = " ".join(cmd if len(cmd) < 14 else [*cmd[:13], "..."])
    log(f"$ {shown}")
    proc = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE if capture else None, **kw)
    if proc.returncode != 0:
        raise BuildFailure(f"command failed with exit code {proc.returncode}: {shown}")
    return proc.stdout if capture else ""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise BuildFailure(f"cannot read a package name from requirement {req!r}")
    return canonical(m.group(1))


class Timer:
    def __init__(self) -> None:
        self.steps: list[tuple[str, float, str]] = []

    def step(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.monotonic()
                self.note = ""
                return self

            def __exit__(self, *exc):
                timer.steps.append((name, time.monotonic() - self.t0, self.note))
                return False

        return _Ctx()

    def report(self) -> str:
        width = max((len(n) for n, _, _ in self.steps), default=4)
        lines = [f"  {n:<{width}}  {t:7.1f} s  {note}".rstrip() for n, t, note in self.steps]
        total = sum(t for _, t, _ in self.steps)
        return "\n".join(["timings:", *lines, f"  {'total':<{width}}  {total:7.1f} s"])


# --------------------------------------------------------------------------------------------------
# project packages


@dataclass
class Package:
    name: str  # canonical distribution name, e.g. interiorfusion-data
    path: Path
    module: str  # import name, e.g. interiorfusion_data
    requires: list[str]  # third-party requirement strings (markers kept)
    project_deps: list[str] = field(default_factory=list)  # canonical names of project packages it needs
    # The stages it registers (`interiorfusion.stages` entry points): each gets an image. A package that holds
    # only a config schema (`interiorfusion.configs`) is a dependency, not an image; one that registers several
    # (finetune: lora, grpo) gives each its own image of the same package.
    stages: list[str] = field(default_factory=list)

    @property
    def runs_stage(self) -> bool:
        return bool(self.stages)

    @property
    def short(self) -> str:
        return self.name.removeprefix("interiorfusion-")


def discover_packages() -> dict[str, Package]:
    dirs = [*sorted((REPO / "stages").glob("*/pyproject.toml")), REPO / "flows" / "pyproject.toml"]
    raw: dict[str, tuple[Path, list[str], bool]] = {}
    for pyproject in dirs:
        if not pyproject.exists():
            continue
        meta = tomllib.loads(pyproject.read_text())["project"]
        if "dependencies" in meta.get("dynamic", []):
            raise BuildFailure(f"{pyproject}: dynamic dependencies are not supported by the image build")
        stages = sorted(meta.get("entry-points", {}).get("interiorfusion.stages", {}))
        raw[canonical(meta["name"])] = (pyproject.parent, list(meta.get("dependencies", [])), stages)
    packages = {}
    for name, (path, reqs, stages) in raw.items():
        third_party = [r for r in reqs if requirement_name(r) not in raw]
        project = [requirement_name(r) for r in reqs if requirement_name(r) in raw]
        packages[name] = Package(name, path, name.replace("-", "_"), third_party, project, stages)
    return packages


def closure_of(packages: dict[str, Package], roots: list[str]) -> list[str]:
    """Project packages needed by ``roots`` (inclusive), dependencies first."""
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in stack:
            raise BuildFailure(
                f"project packages import each other in a cycle: {' -> '.join((*stack, name))}"
            )
        if name in order:
            return
        for dep in packages[name].project_deps:
            visit(dep, (*stack, name))
        order.append(name)

    for root in roots:
        visit(root, ())
    return order


def source_digest(path: Path) -> str:
    h = hashlib.sha256()
    skip_dirs = {"build", "dist", "__pycache__", ".pytest_cache"}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if any(part in skip_dirs or part.endswith(".egg-info") for part in rel.parts) or not p.is_file():
            continue
        if p.suffix in {".pyc", ".pyo"}:
            continue
        h.update(str(rel).encode() + b"\0" + sha256_file(p).encode() + b"\0")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# the builder


class Builder:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.timer = Timer()
        self.cache = Path(args.cache_dir).resolve()
        self.wheelhouse = Path(args.wheelhouse).resolve()
        self.project_dir = self.wheelhouse / "project"
        self.deps_dir = self.wheelhouse / "deps"
        self.packages = discover_packages()
        self.docker = args.docker or pick_docker()
        self.env = dict(os.environ)
        self.env["DOCKER_BUILDKIT"] = "1" if args.buildkit else "0"
        self.pip = [sys.executable, "-m", "pip"]
        # The torchvision built against the images' torch: a pip constraint on every resolution, so an image
        # that pulls torchvision in (directly or through lpips and the like) gets that build or none at all.
        self.torchvision_pin = torchvision_for(args.torch_spec)

    # ---- helpers
    def docker_cmd(self, *a: str) -> list[str]:
        return [self.docker, *a]

    def image_label(self, image: str, label: str) -> str | None:
        proc = subprocess.run(
            self.docker_cmd("image", "inspect", "--format", "{{json .Config.Labels}}", image),
            env=self.env,
            text=True,
            capture_output=True,
        )
        if proc.returncode != 0:
            return None
        labels = json.loads(proc.stdout.strip() or "null") or {}
        return labels.get(label, "")

    def image_exists(self, image: str) -> bool:
        return self.image_label(image, INPUTS_LABEL) is not None

    def image_size(self, image: str) -> int:
        out = run(
            self.docker_cmd("image", "inspect", "--format", "{{.Size}}", image), env=self.env, capture=True
        )
        return int(out.strip())

    # ---- step 1: Debian base
    def ensure_debian(self) -> str:
        if self.args.base_image:
            return self.args.base_image
        with self.timer.step("debian base") as st:
            if self.image_exists(DEBIAN_IMAGE):
                st.note = "cached image"
                return DEBIAN_IMAGE
            tarball = self.cache / "debian-python-bookworm.tar"
            if not tarball.exists():
                self.debootstrap(tarball)
                st.note = "debootstrap + import"
            else:
                st.note = "import of cached rootfs"
            changes = [
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "ENV LANG=C.UTF-8",
                'CMD ["python3"]',
            ]
            cmd = self.docker_cmd("import")
            for c in changes:
                cmd += ["--change", c]
            cmd += [str(tarball), DEBIAN_IMAGE]
            run(cmd, env=self.env)
            return DEBIAN_IMAGE

    def debootstrap(self, tarball: Path) -> None:
        if not shutil.which("debootstrap"):
            raise BuildFailure(
                "debootstrap is not installed (apt-get install debootstrap; see containers/ci-setup.sh)"
            )
        if os.geteuid() != 0:
            raise BuildFailure("debootstrap needs root; run as root or pass --base-image")
        tarball.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="if-rootfs-", dir=tarball.parent) as tmp:
            rootfs = Path(tmp) / "rootfs"
            run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={DEBIAN_PACKAGES}",
                    "bookworm",
                    str(rootfs),
                    self.args.debian_mirror,
                ]
            )
            # Drop what a runtime image never needs: apt lists and caches, docs, man pages, logs.
            for sub in ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "var/log"):
                target = rootfs / sub
                if target.exists():
                    shutil.rmtree(target)
                    target.mkdir(parents=True)
            partial = tarball.with_suffix(".tar.partial")
            run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."])
            partial.rename(tarball)

    def check_python(self, image: str) -> None:
        """The wheelhouse is resolved by this interpreter, so the image must run the same Python minor."""
        out = run(
            self.docker_cmd(
                "run",
                "--rm",
                "--network",
                "none",
                "--entrypoint",
                "python3",
                image,
                "-c",
                "import sys; print('%d.%d' % sys.version_info[:2])",
            ),
            env=self.env,
            capture=True,
        ).strip()
        here = "{}.{}".format(*sys.version_info[:2])
        if out != here:
            raise BuildFailure(
                f"{image} runs Python {out} but this build runs Python {here}, and the wheelhouse is resolved"
                f" for the build's interpreter; run build.sh with Python {out} (PYTHON=python{out})"
            )

    # ---- step 2: project wheels
    def build_project_wheels(self, names: list[str]) -> dict[str, Path]:
        self.project_dir.mkdir(parents=True, exist_ok=True)
        wheels: dict[str, Path] = {}
        with self.timer.step("project wheels") as st:
            built = []
            for name in names:
                pkg = self.packages[name]
                stamp = self.project_dir / f"{name}.digest"
                src = source_digest(pkg.path)
                existing = sorted(self.project_dir.glob(f"{pkg.module}-*.whl"))
                if len(existing) == 1 and stamp.exists() and stamp.read_text() == src:
                    wheels[name] = existing[0]
                    continue
                for old in existing:
                    old.unlink()
                with tempfile.TemporaryDirectory(prefix="if-wheel-") as tmp:
                    # Build from a copy so a checkout's build/ and *.egg-info never leak into the wheel.
                    copy = Path(tmp) / "src"
                    shutil.copytree(
                        pkg.path,
                        copy,
                        ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"),
                    )
                    cmd = [*self.pip, "wheel", "--quiet", "--no-deps", *self.isolation_flags()]
                    run([*cmd, "-w", str(self.project_dir), str(copy)])
                made = sorted(self.project_dir.glob(f"{pkg.module}-*.whl"))
                if len(made) != 1:
                    raise BuildFailure(f"expected one wheel for {name} in {self.project_dir}, found {made}")
                stamp.write_text(src)
                wheels[name] = made[0]
                built.append(pkg.short)
            st.note = f"built {', '.join(built)}" if built else "all cached"
        return wheels

    @staticmethod
    def isolation_flags() -> list[str]:
        """Skip pip's isolated build environment (seconds per package) when this interpreter already has a
        setuptools that satisfies the packages' build-system (>=68) and builds wheels by itself (>=70.1)."""
        try:
            version = importlib.metadata.version("setuptools")
        except importlib.metadata.PackageNotFoundError:
            return []
        major, minor = (int(x) for x in re.findall(r"\d+", version)[:2])
        return ["--no-build-isolation"] if (major, minor) >= (70, 1) else []

    # ---- step 3: wheelhouse
    def third_party(self, names: list[str]) -> list[str]:
        reqs: list[str] = []
        for name in names:
            for r in self.packages[name].requires:
                if r not in reqs:
                    reqs.append(r)
        return reqs

    def needs_torchvision(self, names: list[str]) -> bool:
        """Whether any of these project packages declares torchvision (a stage that uses it only through
        another package, such as lpips, declares it too, so the build can tell which images need it)."""
        return any(requirement_name(r) == "torchvision" for r in self.third_party(names))

    def constraints(self) -> list[str]:
        """pip constraints for every resolution: the torch spec, and the torchvision that matches it."""
        return [self.args.torch_spec, *([self.torchvision_pin] if self.torchvision_pin else [])]

    def constraints_file(self) -> Path:
        path = self.cache / "constraints.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(self.constraints()) + "\n"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        return path

    def torchvision_obtainable(self) -> bool:
        """Whether pip can get the paired torchvision wheel here: already in the wheelhouse, or from the indexes
        and find-links of this host's pip configuration (a download of that one wheel, without dependencies)."""
        pin = self.torchvision_pin
        if pin is None:
            return False
        version = pin.split("==", 1)[1]
        if any(self.deps_dir.glob(f"torchvision-{version}-*.whl")):
            return True
        with tempfile.TemporaryDirectory(prefix="if-probe-") as tmp:
            cmd = [*self.pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", tmp]
            if self.deps_dir.is_dir():
                cmd += ["--find-links", str(self.deps_dir)]
            log(f"$ {' '.join([*cmd, pin])}")
            proc = subprocess.run([*cmd, pin], env=self.env, capture_output=True, text=True)
        return proc.returncode == 0

    def wheelhouse_stages(self, known: list[str], selected: list[str]) -> list[str]:
        """The stages whose requirements go into the shared offline wheelhouse.

        Every stage, except that stages needing a torchvision that cannot be had here are left out when they
        are not being built (a data image must not fail for the material stage's sake); when one of them is
        being built, the build stops with one sentence saying which wheel is missing and the ways out.
        """
        wanting = [s for s in known if self.needs_torchvision(closure_of(self.packages, [self.package_of(s)]))]
        if not wanting:
            return known
        if self.torchvision_pin is not None and self.torchvision_obtainable():
            return known
        blocked = [s for s in selected if s in wanting]
        if blocked:  # main() has refused a torch spec without a pair already
            raise BuildFailure(
                missing_torchvision_message(blocked, self.args.torch_spec, self.torchvision_pin, self.deps_dir)
            )
        left_out = [s for s in wanting if s not in selected]
        log(
            f"wheelhouse: leaving out {', '.join(left_out)} (needs {self.torchvision_pin or 'torchvision'},"
            " not obtainable here), which is not being built"
        )
        return [s for s in known if s not in left_out]

    def ensure_wheelhouse(self, reqs: list[str]) -> None:
        stamp_file = self.deps_dir / ".stamp.json"
        want = digest(
            {
                "reqs": sorted(reqs),
                "constraints": self.constraints(),
                "py": sys.version_info[:2],
                "layout": LAYOUT_VERSION,
            }
        )
        with self.timer.step("wheelhouse") as st:
            if not self.args.refresh_wheelhouse and stamp_file.exists():
                stamp = json.loads(stamp_file.read_text())
                if stamp["inputs"] == want and all((self.deps_dir / n).exists() for n in stamp["files"]):
                    st.note = f"cached, {len(stamp['files'])} wheels"
                    return
            self.deps_dir.mkdir(parents=True, exist_ok=True)
            stamp_file.unlink(missing_ok=True)
            # `pip wheel --prefer-binary`: takes published wheels as they are and builds a wheel for the rare
            # sdist-only package on the host, so the image never compiles anything. Wheels already in the
            # wheelhouse are found through --find-links and not fetched again.
            cmd = [*self.pip, "wheel", "--quiet", "--progress-bar", "off", "--prefer-binary"]
            cmd += ["--find-links", str(self.deps_dir), "-w", str(self.deps_dir)]
            cmd += ["--constraint", str(self.constraints_file()), *reqs]
            try:
                run(cmd)
            except BuildFailure as e:
                # A dependency that pulls torchvision in without the stage declaring it ends here.
                if self.torchvision_pin and not self.torchvision_obtainable():
                    raise BuildFailure(
                        f"{e}; a dependency may need torchvision, and {self.torchvision_pin} (the build that"
                        f" matches {self.args.torch_spec}) is not obtainable here: if a stage needs it, declare"
                        " torchvision in its pyproject.toml so the build can say which image needs it"
                    ) from None
                raise
            # Keep exactly the resolved closure: a version bump must not leave the old wheel behind to be
            # picked by a later offline install.
            keep = sorted(p.name for p in self.resolve(reqs))
            for p in self.deps_dir.glob("*.whl"):
                if p.name not in keep:
                    p.unlink()
            size = sum((self.deps_dir / n).stat().st_size for n in keep)
            stamp_file.write_text(json.dumps({"inputs": want, "files": keep}, indent=1))
            st.note = f"{len(keep)} wheels, {size >> 20} MiB"

    def resolve(self, reqs: list[str]) -> list[Path]:
        """Wheel files of the full closure of ``reqs``, resolved offline from the wheelhouse alone."""
        listing = sorted((p.name, p.stat().st_size) for p in self.deps_dir.glob("*.whl"))
        key = digest({"reqs": reqs, "constraints": self.constraints(), "wheels": listing, "v": LAYOUT_VERSION})
        memo = self.cache / "resolved" / f"{key}.json"
        if memo.exists():
            return [self.deps_dir / n for n in json.loads(memo.read_text())]
        with tempfile.TemporaryDirectory(prefix="if-resolve-") as tmp:
            report = Path(tmp) / "report.json"
            cmd = [*self.pip, "install", "--quiet", "--dry-run", "--ignore-installed", "--no-index"]
            cmd += ["--only-binary=:all:", "--find-links", str(self.deps_dir), "--report", str(report)]
            cmd += ["--constraint", str(self.constraints_file()), *reqs]
            env = dict(self.env)
            # The host's own pip settings (extra indexes, find-links) must not widen an offline resolution.
            env.pop("PIP_FIND_LINKS", None)
            env.pop("PIP_EXTRA_INDEX_URL", None)
            env["PIP_CONFIG_FILE"] = os.devnull
            run(cmd, env=env)
            data = json.loads(report.read_text())
        files = []
        for item in data["install"]:
            url = item["download_info"]["url"]
            if not url.startswith("file://"):
                raise BuildFailure(f"offline resolution left the wheelhouse: {url}")
            files.append(Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)))
        if all(f.parent == self.deps_dir for f in files):
            memo.parent.mkdir(parents=True, exist_ok=True)
            memo.write_text(json.dumps([f.name for f in files]))
        return files

    # ---- step 4: contexts
    def pins(self, files: list[Path]) -> list[str]:
        lines = []
        for f in files:
            name, version = f.name.split("-")[:2]
            lines.append(f"{canonical(name)}=={version}")
        return sorted(lines)

    def fresh_context(self, name: str) -> Path:
        ctx = self.cache / "contexts" / name
        if ctx.exists():
            shutil.rmtree(ctx)
        for sub in ("wheels/torch", "wheels/deps", "project", "requirements"):
            (ctx / sub).mkdir(parents=True)
            (ctx / sub / ".keep").write_text("")
        shutil.copy2(CONTAINERS / "check_overlay.py", ctx / "check_overlay.py")
        return ctx

    @staticmethod
    def link(src: Path, dst_dir: Path) -> None:
        dst = dst_dir / src.name
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    def base_context(self, core_wheel: Path, core_reqs: list[str]) -> tuple[Path, list[Path]]:
        ctx = self.fresh_context("base")
        torch_spec = self.args.torch_spec
        if self.args.online:
            (ctx / "requirements" / "torch.txt").write_text(torch_spec + "\n")
            (ctx / "requirements" / "base.txt").write_text("\n".join(core_reqs) + "\n")
            self.link(core_wheel, ctx / "project")
            return ctx, []
        torch_files = self.resolve([torch_spec])
        all_files = self.resolve([torch_spec, *core_reqs])
        torch_names = {p.name for p in torch_files}
        for f in torch_files:
            self.link(f, ctx / "wheels" / "torch")
        for f in all_files:
            if f.name not in torch_names:
                self.link(f, ctx / "wheels" / "deps")
        (ctx / "requirements" / "torch.txt").write_text("\n".join(self.pins(torch_files)) + "\n")
        (ctx / "requirements" / "base.txt").write_text("\n".join(self.pins(all_files)) + "\n")
        self.link(core_wheel, ctx / "project")
        return ctx, all_files

    def stage_context(
        self, stage: str, wheels: dict[str, Path], base_files: list[Path], project: list[str]
    ) -> Path:
        ctx = self.fresh_context(stage)
        reqs = self.third_party(project)
        extra: list[Path] = []
        if not self.args.online:
            base_names = {p.name for p in base_files}
            full = self.resolve([*self.pins(base_files), *reqs])
            self.check_torchvision(stage, full)
            extra = [f for f in full if f.name not in base_names]
            for f in extra:
                self.link(f, ctx / "wheels" / "deps")
            pins = self.pins(extra)
        else:
            pins = reqs
        (ctx / "requirements" / "stage.txt").write_text("\n".join(pins) + "\n" if pins else "")
        # Also for --online: the index then resolves torchvision inside the build, and must pick the paired one.
        (ctx / "requirements" / "constraints.txt").write_text("\n".join(self.constraints()) + "\n")
        # Project wheels: the stage and the upstream stages it imports; core is already in the base image.
        mine = [n for n in project if n != "interiorfusion-core"]
        for name in mine:
            self.link(wheels[name], ctx / "project")
        (ctx / "requirements" / "project.txt").write_text(
            "".join(f"{canonical(n)}=={wheels[n].name.split('-')[1]}\n" for n in mine)
        )
        return ctx

    def check_torchvision(self, stage: str, files: list[Path]) -> None:
        """A torchvision in an image's closure must be the build paired with the image's torch."""
        for f in files:
            name, version = f.name.split("-")[:2]
            if canonical(name) != "torchvision":
                continue
            want = self.torchvision_pin.split("==", 1)[1] if self.torchvision_pin else None
            if version != want:
                raise BuildFailure(
                    f"the {stage} image would get torchvision {version}, but its torch ({self.args.torch_spec})"
                    f" needs {self.torchvision_pin or 'an exact torch pin with a known torchvision'}"
                )

    # ---- step 5: images
    def build_image(
        self, *, image: str, dockerfile: Path, ctx: Path, buildargs: dict[str, str], parent: str, step: str
    ) -> None:
        # What the image is a function of: the parent image (by id), the Dockerfile, the build args and
        # the context. Third-party wheels are named by their pinned version (name and size suffice); project
        # wheels keep their version across code changes, so those and the lock files are hashed.
        parent_id = run(
            self.docker_cmd("image", "inspect", "--format", "{{.Id}}", parent), env=self.env, capture=True
        )
        context = []
        for p in sorted(p for p in ctx.rglob("*") if p.is_file()):
            rel = str(p.relative_to(ctx))
            third_party = rel.startswith("wheels/") and p.suffix == ".whl"
            context.append((rel, p.stat().st_size if third_party else sha256_file(p)))
        inputs = digest(
            {
                "parent": parent_id.strip(),
                "dockerfile": dockerfile.read_text(),
                "args": buildargs,
                "context": context,
                "layout": LAYOUT_VERSION,
            }
        )
        with self.timer.step(step) as st:
            if not self.args.no_cache and self.image_label(image, INPUTS_LABEL) == inputs:
                st.note = "up to date"
                return
            cmd = self.docker_cmd("build", "--network", self.args.network, "-f", str(dockerfile), "-t", image)
            for k, v in buildargs.items():
                cmd += ["--build-arg", f"{k}={v}"]
            cmd += [
                "--label",
                f"{INPUTS_LABEL}={inputs}",
                "--label",
                f"org.interiorfusion.revision={git_rev()}",
            ]
            if self.args.no_cache:
                cmd.append("--no-cache")
            if self.args.buildkit:
                cmd += ["--progress", "plain"]
            cmd.append(str(ctx))
            run(cmd, env=self.env)
            st.note = "built"

    # ---- stages → packages
    def stage_packages(self) -> dict[str, str]:
        """Every stage name registered by a package under stages/ → that package's canonical name."""
        return {s: p.name for p in self.packages.values() if p.path.parent.name == "stages" for s in p.stages}

    def package_of(self, stage: str) -> str:
        return self.stage_packages()[stage]

    # ---- everything
    def main(self) -> int:
        args = self.args
        known = sorted(self.stage_packages())
        stages = known if args.stages in (None, "all") else [s for s in args.stages.split(",") if s]
        unknown = [s for s in stages if s not in known]
        if unknown:
            raise BuildFailure(f"unknown stage(s) {unknown}; packages under stages/ that run a stage: {known}")
        core = "interiorfusion-core"
        if core not in self.packages:
            raise BuildFailure("stages/core/pyproject.toml is missing")
        per_stage = {s: closure_of(self.packages, [self.package_of(s)]) for s in stages}
        needed = closure_of(self.packages, [core, *[self.package_of(s) for s in stages]])

        no_pair = [s for s in stages if self.needs_torchvision(per_stage[s]) and self.torchvision_pin is None]
        if no_pair:
            raise BuildFailure(
                f"the {', '.join(no_pair)} image needs torchvision, which must match torch exactly, but"
                f" --torch-spec {args.torch_spec!r} is not one torch release with a known torchvision"
                f" (TORCHVISION_FOR_TORCH_MINOR in containers/build.py); pin one, e.g. '{DEFAULT_TORCH_SPEC}'"
            )
        base_image = self.ensure_debian()
        if not args.online:
            self.check_python(base_image)
        wheels = self.build_project_wheels(needed)
        core_reqs = self.packages[core].requires
        if not args.online:
            # One resolution over every image's requirements: base and stages agree on shared versions.
            in_wheelhouse = self.wheelhouse_stages(known, stages)
            all_stage_pkgs = closure_of(self.packages, [self.package_of(s) for s in in_wheelhouse] + [core])
            self.ensure_wheelhouse([args.torch_spec, *self.third_party(all_stage_pkgs)])
        with self.timer.step("contexts"):
            base_ctx, base_files = self.base_context(wheels[core], core_reqs)
            stage_ctx = {s: self.stage_context(s, wheels, base_files, per_stage[s]) for s in stages}

        common = {"OFFLINE": "0" if args.online else "1"}
        if args.online:
            common["PIP_INDEX_URL"] = args.index_url
            if args.extra_index_url:
                common["PIP_EXTRA_INDEX_URL"] = args.extra_index_url
        base_tag = f"{args.prefix}/base:{args.tag}"
        self.build_image(
            image=base_tag,
            dockerfile=CONTAINERS / "base" / "Dockerfile",
            ctx=base_ctx,
            buildargs={"BASE_IMAGE": base_image, "TORCH_SPEC": args.torch_spec, **common},
            parent=base_image,
            step="image base",
        )
        for s in stages:
            own = CONTAINERS / s / "Dockerfile"
            self.build_image(
                image=f"{args.prefix}/{s}:{args.tag}",
                dockerfile=own if own.exists() else CONTAINERS / "stage" / "Dockerfile",
                ctx=stage_ctx[s],
                buildargs={"BASE": base_tag, "STAGE": s, "PACKAGE": self.packages[self.package_of(s)].short,
                           **common},
                parent=base_tag,
                step=f"image {s}",
            )
        print(self.timer.report(), file=sys.stderr)
        for image in [base_tag, *[f"{args.prefix}/{s}:{args.tag}" for s in stages]]:
            print(f"{image}\t{self.image_size(image) / 1e6:.0f} MB")
        return 0


def git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True
        )
        return rev + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def supports_buildkit(docker: str) -> bool:
    """True when ``docker build`` with DOCKER_BUILDKIT=1 works: a buildx plugin, or a pre-23 client with the
    builder built in (Debian's docker.io 20.10). A 23+ client without buildx refuses BuildKit."""
    try:
        if subprocess.run([docker, "buildx", "version"], capture_output=True, timeout=20).returncode == 0:
            return True
        out = subprocess.run(
            [docker, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    m = re.match(r"(\d+)\.", out.strip())
    return bool(m) and int(m.group(1)) < 23


def pick_docker() -> str:
    candidates = [c for c in (shutil.which("docker"), "/usr/bin/docker") if c and os.access(c, os.X_OK)]
    if not candidates:
        raise BuildFailure("no docker CLI found (apt-get install docker.io; see containers/ci-setup.sh)")
    for c in dict.fromkeys(candidates):
        if supports_buildkit(c):
            return c
    return candidates[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--stages", default="all", help="comma-separated stages to build (default: every stage package)"
    )
    p.add_argument("--tag", default=os.environ.get("INTERIORFUSION_IMAGE_TAG", "latest"))
    p.add_argument(
        "--prefix",
        default=os.environ.get("INTERIORFUSION_IMAGE_PREFIX", "interiorfusion"),
        help="image name prefix, e.g. registry.example.com/interiorfusion (default interiorfusion)",
    )
    p.add_argument(
        "--base-image",
        default=os.environ.get("INTERIORFUSION_BASE_IMAGE"),
        help="runtime base with python3 + venv (default: the debootstrapped " + DEBIAN_IMAGE + ")",
    )
    p.add_argument("--torch-spec", default=os.environ.get("INTERIORFUSION_TORCH_SPEC", DEFAULT_TORCH_SPEC))
    p.add_argument(
        "--online", action="store_true", help="install third-party packages from the index, no wheelhouse"
    )
    p.add_argument("--index-url", default="https://pypi.org/simple", help="with --online")
    p.add_argument(
        "--extra-index-url",
        default="https://download.pytorch.org/whl/cpu",
        help="with --online (torch builds)",
    )
    p.add_argument(
        "--wheelhouse", default=os.environ.get("INTERIORFUSION_WHEELHOUSE", str(REPO / ".wheelhouse"))
    )
    p.add_argument(
        "--cache-dir",
        default=os.environ.get(
            "INTERIORFUSION_CONTAINERS_CACHE", str(REPO / ".interiorfusion" / "containers")
        ),
        help="rootfs tarball and build contexts",
    )
    p.add_argument("--debian-mirror", default=os.environ.get("INTERIORFUSION_DEBIAN_MIRROR", DEBIAN_MIRROR))
    p.add_argument(
        "--network", default="host", help="network for RUN steps (host, or none for a sealed build)"
    )
    p.add_argument(
        "--docker", default=os.environ.get("DOCKER"), help="docker CLI (default: one that does BuildKit)"
    )
    p.add_argument("--no-cache", action="store_true", help="rebuild images without Docker's layer cache")
    p.add_argument(
        "--refresh-wheelhouse", action="store_true", help="re-resolve the wheelhouse even if unchanged"
    )
    bk = p.add_mutually_exclusive_group()
    bk.add_argument("--buildkit", dest="buildkit", action="store_true", default=None)
    bk.add_argument("--legacy-builder", dest="buildkit", action="store_false")
    args = p.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.docker is None:
            args.docker = pick_docker()
        if args.buildkit is None:
            args.buildkit = supports_buildkit(args.docker)
        return Builder(args).main()
    except BuildFailure as e:
        print(f"build failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
