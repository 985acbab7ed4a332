"""Find a Triton perf_analyzer that runs on this machine, or say why there is none.

    python bench/perf_analyzer.py          # prints the binary it would use, or the reason
    python bench/perf_analyzer.py --fetch  # also fetches tritonclient 2.48's binary if needed

perf_analyzer is no longer in the newest tritonclient wheels (it moved to the `perf-analyzer`
package), and the wheels that carry it from 2.52 on are built for glibc 2.38. tritonclient 2.48's
binary runs on older systems (Debian 12's glibc 2.36); it links libcudart.so.12 (from pip's
nvidia-cuda-runtime-cu12, no GPU needed) and libb64.so.0d (Debian/Ubuntu: apt-get install
libb64-0d). The order searched: $PERF_ANALYZER, PATH and this Python's bin/, then the cache
(~/.cache/cnnctl/perf_analyzer-2.48.0), which --fetch (or find(), by default) fills with pip.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

VERSION = "2.48.0"
CUDA_RUNTIME = "nvidia-cuda-runtime-cu12"


class PerfAnalyzerMissing(RuntimeError):
    """No runnable perf_analyzer; the message says what to do."""


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "cnnctl" / f"perf_analyzer-{VERSION}"


def _cuda_lib_dirs() -> list[str]:
    dirs = [str(cache_dir() / "lib")]
    try:
        import nvidia.cuda_runtime  # pip's CUDA runtime, when this Python has it

        dirs += [str(Path(p) / "lib") for p in nvidia.cuda_runtime.__path__]
    except ImportError:
        pass
    return dirs


def env() -> dict[str, str]:
    """The environment to run perf_analyzer in: its libcudart on the library path."""
    path = ":".join([*_cuda_lib_dirs(), os.environ.get("LD_LIBRARY_PATH", "")])
    return {**os.environ, "LD_LIBRARY_PATH": path.rstrip(":")}


def _missing_libraries(exe: str) -> list[str]:
    done = subprocess.run(["ldd", exe], capture_output=True, text=True, env=env())
    return re.findall(r"^\s*(\S+) => not found", done.stdout, re.MULTILINE)


def _candidates() -> list[str]:
    found = [os.environ.get("PERF_ANALYZER", "")]
    found.append(shutil.which("perf_analyzer") or "")
    found.append(shutil.which("perf_analyzer", path=str(Path(sys.executable).parent)) or "")
    found.append(str(cache_dir() / "bin" / "perf_analyzer"))
    return [f for f in dict.fromkeys(found) if f and Path(f).is_file()]


def fetch() -> Path:
    """Download tritonclient 2.48's wheel and the CUDA runtime with pip; unpack what it needs."""
    target = cache_dir()
    (target / "bin").mkdir(parents=True, exist_ok=True)
    (target / "lib").mkdir(exist_ok=True)
    wheels = target / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--disable-pip-version-check", "-d", str(wheels),
                    f"tritonclient=={VERSION}", CUDA_RUNTIME], check=True)
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.endswith("/bin/perf_analyzer"):
                    dst = target / "bin" / "perf_analyzer"
                elif re.search(r"/lib/libcudart\.so\.12$", name):
                    dst = target / "lib" / "libcudart.so.12"
                else:
                    continue
                dst.write_bytes(z.read(name))
                dst.chmod(0o755)
    shutil.rmtree(wheels, ignore_errors=True)
    return target / "bin" / "perf_analyzer"


def find(fetch_if_missing: bool = True) -> str:
    """The path of a perf_analyzer whose libraries all resolve (run it with ``env()``)."""
    problems = []
    candidates = _candidates()
    if not candidates and fetch_if_missing:
        try:
            fetch()
        except (subprocess.CalledProcessError, OSError) as exc:
            problems.append(f"fetching tritonclient {VERSION}'s binary with pip failed ({exc})")
        candidates = _candidates()
    for exe in candidates:
        missing = _missing_libraries(exe)
        if not missing:
            return exe
        hint = " (apt-get install libb64-0d)" if "libb64.so.0d" in missing else ""
        problems.append(f"{exe} needs {', '.join(missing)}{hint}")
    if not candidates and not problems:
        problems.append(f"none found; run `python bench/perf_analyzer.py --fetch` to fetch "
                        f"tritonclient {VERSION}'s")
    raise PerfAnalyzerMissing("no runnable perf_analyzer: " + "; ".join(problems) + ". The "
                              "newest tritonclient wheels no longer ship it and those from 2.52 "
                              "on need glibc 2.38; set PERF_ANALYZER to a working binary.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetch", action="store_true", help="fetch tritonclient 2.48's binary "
                        "into the cache if none is found")
    args = parser.parse_args()
    try:
        print(find(fetch_if_missing=args.fetch))
    except PerfAnalyzerMissing as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
