"""Check an overlay install before it is merged over the virtual environment of the image.

Stage and app layers are installed with ``pip install --prefix /overlay/opt/venv`` and copied over /opt/venv.
That is only sound when the overlay adds distributions: a copy can overwrite files but cannot delete the old
version's files or its dist-info. If a stage needs another version of a package the base image already has,
the fix is to align the pins (one wheelhouse resolution covers every image), so fail loudly here.

Project wheels are installed with ``--no-deps`` (their dependencies come from the lock installed just before),
so ``pip check`` then verifies the merged environment: every requirement of every distribution is satisfied.
"""

import os
import subprocess
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path


def main() -> int:
    prefix = Path(sys.argv[1])
    purelib = Path(sysconfig.get_paths()["purelib"])
    overlay = prefix / purelib.relative_to(sys.prefix)
    base = {
        d.metadata["Name"].lower().replace("_", "-"): d.version for d in distributions(path=[str(purelib)])
    }
    added = {
        d.metadata["Name"].lower().replace("_", "-"): d.version for d in distributions(path=[str(overlay)])
    }
    clashes = sorted(f"{n} {base[n]} -> {v}" for n, v in added.items() if n in base)
    if clashes:
        print(
            "overlay would replace packages of the base environment: " + ", ".join(clashes), file=sys.stderr
        )
        return 1
    env = dict(os.environ, PYTHONPATH=str(overlay))
    check = subprocess.run([sys.executable, "-m", "pip", "check"], env=env, capture_output=True, text=True)
    if check.returncode != 0:
        print("pip check failed for base + overlay:\n" + check.stdout + check.stderr, file=sys.stderr)
        return 1
    print("overlay adds: " + (", ".join(f"{n}=={v}" for n, v in sorted(added.items())) or "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
