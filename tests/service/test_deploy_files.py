"""Dockerfile, docker-compose.yml and .dockerignore, checked without a Docker engine: every
command, option, module, CBIR_* variable, path, port and route they name must exist in the
project (read from the Typer app, Settings, alembic.ini, pyproject.toml and the FastAPI app).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

import pytest
import typer.main
import yaml  # PyYAML: not a direct dependency; schemathesis (dev extra) pulls it in
from alembic.config import Config
from alembic.script import ScriptDirectory

from indexer.build import DEFAULT_CHECKPOINT, REPO_ROOT
from service.cli import app as cli_app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
ENV_PREFIX = Settings.model_config["env_prefix"]
SETTINGS_VARS = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
SETTINGS_VAR = re.compile(rf"\b{re.escape(ENV_PREFIX)}[A-Z0-9_]+")
PORT = Settings.model_fields["port"].default
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = set(PYPROJECT["optional-dependencies"])
# The checkpoint folder may not exist yet (no trained checkpoint ships so far): paths are
# checked against indexer.build.DEFAULT_CHECKPOINT, the file itself only once it exists.
CHECKPOINT_DIR = DEFAULT_CHECKPOINT.parent.relative_to(REPO_ROOT).as_posix()
# What the base images provide (python:3.11-slim: Debian, sh and pip; postgres:16: pg_isready).
BASE_COMMANDS = {"sh", "set", "[", "test", "ls", "mkdir", "chown", "rm", "useradd", "pg_isready"}


# -- Dockerfile ------------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction. Continuations are joined as Docker joins them (the
    backslash and newline removed) and comment lines inside them dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a POSIX sh script: split at newlines, ; && || | and parentheses,
    with shell keywords and leading VAR=value assignments dropped and redirection targets
    skipped. A quoted $(...) stays one word and is not looked into."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words, skip_target = [], False
        for token in [*lexer, ";"]:
            if skip_target:
                skip_target = False
            elif set(token) <= set("();<>|&"):
                if "<" in token or ">" in token:
                    skip_target = True
                else:
                    commands.append(words)
                    words = []
            else:
                words.append(token)
    keywords = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!", "exec"}
    simple = []
    for words in commands:
        while words and (words[0] in keywords or re.match(r"\w+=", words[0])):
            words = words[1:]
        if words:
            simple.append(words)
    return simple


def argv_commands(argv: list[str]) -> list[list[str]]:
    """An exec-form command; `sh -c SCRIPT` is looked into."""
    if argv[0] in ("sh", "bash") and argv[1:2] == ["-c"]:
        return shell_commands(argv[2])
    return [argv]


def instruction_commands(args: str) -> list[list[str]]:
    return argv_commands(json.loads(args)) if args.startswith("[") else shell_commands(args)


DOCKERFILE = dockerfile_instructions((ROOT / "Dockerfile").read_text())
WORKDIR = PurePosixPath([a for k, a in DOCKERFILE if k == "WORKDIR"][-1])
ARGS = dict(a.partition("=")[::2] for k, a in DOCKERFILE if k == "ARG")  # NAME: default
CMD = instruction_commands([a for k, a in DOCKERFILE if k == "CMD"][-1])
RUN_COMMANDS = [c for k, a in DOCKERFILE if k == "RUN" for c in instruction_commands(a)]
COPIES = []  # (sources, destination as written)
for _keyword, _args in DOCKERFILE:
    if _keyword in ("COPY", "ADD"):
        _parts = [p for p in (json.loads(_args) if _args.startswith("[") else _args.split())
                  if not p.startswith("--")]
        COPIES.append((_parts[:-1], _parts[-1]))


def copy_source(source: str) -> str | None:
    """The repository path a COPY source names; a glob that matches nothing names the
    checkpoint folder (copied once it exists) or nothing."""
    source = source.rstrip("/")
    if not any(c in source for c in "*?["):
        return source if (ROOT / source).exists() else None
    matches = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob(source))
    if matches:
        return matches[0]
    return CHECKPOINT_DIR if fnmatch(CHECKPOINT_DIR, source) else None


def repo_path(image_path: PurePosixPath) -> Path | None:
    """Where a path inside the image comes from in the repository, through COPY."""
    for sources, written in COPIES:
        dest = WORKDIR / written
        into_folder = written.endswith("/") or written == "." or len(sources) > 1
        for source in sources:
            name = copy_source(source)
            if name is None:
                continue
            if (ROOT / name).is_file() and into_folder:
                target = dest / PurePosixPath(name).name
            else:
                target = dest  # a folder's contents, or a file copied to a file name
            if image_path == target or target in image_path.parents:
                return ROOT / name / image_path.relative_to(target)
    return None


# -- docker-compose.yml ----------------------------------------------------------------------

INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>\w+)(?P<op>:?[-?])?(?P<arg>[^}]*)\}"
                           r"|\$(?P<bare>\w+)")


def interpolate(value):
    """Compose's interpolation with every variable unset: ${X:-d} -> d, ${X:?m} -> <X>,
    $$ -> $ (a literal $ for the container's shell)."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        if m[0] == "$$":
            return "$"
        return m["arg"] if m["op"] in ("-", ":-") else f"<{m['name'] or m['bare']}>"

    return INTERPOLATION.sub(substitute, value)


def strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


def interpolation_problems(compose: dict) -> list[str]:
    """Host variables compose reads: each needs a default (${X:-d}) or a message (${X:?m})."""
    problems = []
    for text in strings(compose):
        for m in INTERPOLATION.finditer(text):
            if m[0] != "$$" and m["op"] not in ("-", ":-", "?", ":?"):
                problems.append(f"{m[0]}: no default and not required with a message")
    return problems


COMPOSE_RAW = yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # merge keys resolved
COMPOSE = interpolate(COMPOSE_RAW)
SERVICES = COMPOSE["services"]


def builds_our_image(service: dict) -> bool:
    build = service.get("build")
    context = build if isinstance(build, str) else (build or {}).get("context")
    return context is not None and (ROOT / context).resolve() == ROOT


IMAGE_SERVICES = {n: s for n, s in SERVICES.items() if builds_our_image(s)}


def service_commands(service: dict) -> list[list[str]]:
    """What the container runs: its command, or the image's CMD."""
    command = service.get("command")
    if command is None:
        return CMD if builds_our_image(service) else []
    return argv_commands(shlex.split(command) if isinstance(command, str) else command)


def healthcheck_commands(service: dict) -> list[list[str]]:
    test = service.get("healthcheck", {}).get("test")
    if isinstance(test, str):
        return shell_commands(test)
    if test and test[0] == "CMD":
        return [test[1:]]
    if test and test[0] == "CMD-SHELL":
        return shell_commands(test[1])
    return []


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each volume; tmpfs targets have source 'tmpfs'."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out.append((volume.get("source", ""), volume["target"], volume.get("read_only", False)))
        else:
            source, target, *mode = volume.split(":")
            out.append((source, target, "ro" in mode))
    tmpfs = service.get("tmpfs", [])
    return out + [("tmpfs", t, False) for t in ([tmpfs] if isinstance(tmpfs, str) else tmpfs)]


def is_named_volume(source: str) -> bool:
    return source != "tmpfs" and not source.startswith((".", "/", "~"))


# -- the checker -----------------------------------------------------------------------------

def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def cbir_problems(args: list[str]) -> list[str]:
    """Subcommands and options as the Typer app defines them, and its required options. (Typer
    vendors click, so groups and options are recognised by their attributes.)"""
    command, path, given, problems = typer.main.get_command(cli_app), "cbir", set(), []
    for arg in args:
        if arg.startswith("-"):
            option = arg.split("=", 1)[0]
            known = {o for p in command.params for o in p.opts + p.secondary_opts}
            if option not in known | {"--help"}:
                problems.append(f"{path}: no option {option}")
            given.add(option)
        elif hasattr(command, "commands"):
            if arg not in command.commands:
                return [*problems, f"{path}: no command {arg!r}"]
            command, path, given = command.commands[arg], f"{path} {arg}", set()
    if hasattr(command, "commands"):
        return [*problems, f"{path}: a group, not a command"]
    return problems + [f"{path}: required option {p.opts[0]} missing" for p in command.params
                       if p.param_type_name == "option" and p.required and not given & set(p.opts)]


def python_problems(args: list[str]) -> list[str]:
    if args[:1] == ["-m"]:
        return [] if module_exists(args[1]) else [f"python -m {args[1]}: no such module"]
    if args[:1] == ["-c"]:
        try:
            tree = ast.parse(args[1])
        except SyntaxError as exc:
            return [f"python -c: {exc}"]
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        return [f"python -c imports {m}: no such module" for m in sorted(modules)
                if not module_exists(m)]
    return [f"python {' '.join(args)}: only -m and -c are checked"]


def alembic_problems(args: list[str]) -> list[str]:
    if args != ["upgrade", "head"]:
        return [f"alembic {' '.join(args)}: expected `alembic upgrade head`"]
    heads = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini"))).get_heads()
    return [] if len(heads) == 1 else [f"alembic: {len(heads)} heads in migrations/, not 1"]


def pip_problems(args: list[str]) -> list[str]:
    extras = [e.strip() for a in args if (m := re.fullmatch(r"\.\[(.+)\]", a))
              for e in m[1].split(",")]
    return [f"pip install .[{e}]: pyproject.toml has no extra {e!r}" for e in extras
            if e not in EXTRAS]


def ray_problems(args: list[str]) -> list[str]:
    """`ray start` with options that Ray's own command line (a click command) declares."""
    from ray.scripts.scripts import start

    if args[:1] != ["start"]:
        return [f"ray {' '.join(args)}: expected `ray start`"]
    known = {o for p in start.params for o in (*p.opts, *p.secondary_opts)}
    return [f"ray start {a}: no such option" for a in args[1:]
            if a.startswith("--") and a.split("=")[0] not in known]


def command_problems(argv: list[str]) -> list[str]:
    name, args = argv[0], argv[1:]
    checks = {"cbir": cbir_problems, "python": python_problems, "python3": python_problems,
              "alembic": alembic_problems, "pip": pip_problems, "ray": ray_problems}
    if name in checks:
        return checks[name](args)
    return [] if name in BASE_COMMANDS else [f"{name}: neither a project nor a base command"]


def unknown_settings_vars(text: str) -> set[str]:
    return set(SETTINGS_VAR.findall(text)) - SETTINGS_VARS


def urls(commands: list[list[str]]) -> list[tuple[int, str]]:
    """(port, path) of each http URL the commands name."""
    text = " ".join(w for c in commands for w in c)
    return [(int(p), path) for p, path in re.findall(r"https?://[\w.-]+:(\d+)(/[\w/-]*)", text)]


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [s for line in lines if (s := line.strip()) and not s.startswith("#")]


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for our patterns: anchored at the root, * stays in one folder,
    **/ spans folders, a match of any parent folder counts, the last matching pattern wins."""
    def regex(pattern: str) -> re.Pattern:
        out = re.escape(pattern.lstrip("!").strip("/"))
        out = out.replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        return re.compile(out.replace(r"\?", "[^/]"))

    parts = PurePosixPath(rel).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        if any(regex(pattern).fullmatch(p) for p in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


# -- commands --------------------------------------------------------------------------------

def _all_commands() -> list[tuple[str, list[str]]]:
    labelled = [("Dockerfile RUN", c) for c in RUN_COMMANDS] + [("Dockerfile CMD", c) for c in CMD]
    for name, service in SERVICES.items():
        if "command" in service:
            labelled += [(f"compose {name}", c) for c in service_commands(service)]
        labelled += [(f"compose {name} healthcheck", c) for c in healthcheck_commands(service)]
    return labelled


ALL_COMMANDS = _all_commands()


@pytest.mark.parametrize("argv", [c for _, c in ALL_COMMANDS],
                         ids=[f"{where}: {' '.join(c[:3])}" for where, c in ALL_COMMANDS])
def test_command_exists_in_project(argv):
    assert command_problems(argv) == []


def test_commands_were_found():
    names = {c[0] for _, c in ALL_COMMANDS}
    assert {"cbir", "alembic", "pip", "python", "pg_isready"} <= names
    cbir = {" ".join(c[:3]) for _, c in ALL_COMMANDS if c[0] == "cbir"}
    assert {"cbir serve --index", "cbir synth --out", "cbir index build"} <= cbir


def test_checker_reports_mistakes():
    """The checker is not vacuous: each wrong line below is reported."""
    bad = dockerfile_instructions(
        "FROM python:3.11-slim\n"
        "RUN cbir index biuld --data /d \\\n"
        "    # a comment inside a continuation\n"
        "    --out /i && python -m not_a_module_of_ours > /dev/null\n"
        'CMD ["cbri", "serve"]\n'
        "ENV CBIR_NOT_A_SETTING=1 CBIR_API_KEY=k\n")
    assert [k for k, _ in bad] == ["FROM", "RUN", "CMD", "ENV"]
    commands = [c for k, a in bad if k in ("RUN", "CMD") for c in instruction_commands(a)]
    assert commands == [["cbir", "index", "biuld", "--data", "/d", "--out", "/i"],
                        ["python", "-m", "not_a_module_of_ours"], ["cbri", "serve"]]
    problems = [p for c in commands for p in command_problems(c)]
    assert problems == ["cbir index: no command 'biuld'",
                        "python -m not_a_module_of_ours: no such module",
                        "cbri: neither a project nor a base command"]
    assert command_problems(["cbir", "synth", "--outt", "x"]) == [
        "cbir synth: no option --outt", "cbir synth: required option --out missing"]
    assert command_problems(["cbir", "index"]) == ["cbir index: a group, not a command"]
    assert command_problems(["alembic", "upgrade", "heda"])
    assert command_problems(["python", "-c", "import not_a_module_of_ours"])
    assert command_problems(["pip", "install", ".[gpuu]"])
    assert unknown_settings_vars(bad[-1][1]) == {"CBIR_NOT_A_SETTING"}
    assert interpolation_problems({"x": ["${BRATS_DIR}", "$HOME", "${A:-1} ${B:?m} $$C"]}) == [
        "${BRATS_DIR}: no default and not required with a message",
        "$HOME: no default and not required with a message"]
    assert dockerignored("data/x.nii.gz", ["/data"])
    assert not dockerignored("model/data/brats.py", ["/data"])
    assert dockerignored("model/__pycache__/a.pyc", ["**/__pycache__"])


# -- variables -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Dockerfile", "docker-compose.yml"])
def test_cbir_variables_are_settings_fields(name):
    """Every CBIR_* name is a Settings field (alembic's CBIR_DB_URL is one too)."""
    assert unknown_settings_vars((ROOT / name).read_text()) == set()


def test_image_services_set_only_settings_variables():
    for name, service in IMAGE_SERVICES.items():
        assert set(service.get("environment", {})) <= SETTINGS_VARS, name


def test_host_variables_have_defaults_or_are_required():
    assert interpolation_problems(COMPOSE_RAW) == []


# -- Dockerfile ------------------------------------------------------------------------------

@pytest.mark.parametrize("source", [s for sources, _ in COPIES for s in sources])
def test_copy_source_exists_and_is_not_dockerignored(source):
    name = copy_source(source)
    assert name is not None, f"COPY {source}: nothing in the repository"
    assert not dockerignored(name, dockerignore_patterns()), f"COPY {source} is .dockerignored"


def test_dockerignore_keeps_secrets_and_environments_out():
    for rel in (".env", ".venv", ".git", "data", "model/__pycache__"):
        assert dockerignored(rel, dockerignore_patterns()), rel


def test_expose_and_cmd_use_the_settings_port():
    assert [a for k, a in DOCKERFILE if k == "EXPOSE"] == [str(PORT)]
    (serve,) = CMD
    assert serve[:2] == ["cbir", "serve"] and serve[serve.index("--port") + 1] == str(PORT)


def test_torch_pin_matches_makefile():
    make = re.search(r"^TORCH \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert ARGS["TORCH_VERSION"] == make[1]


def test_requirements_list_installs_exactly_one_faiss():
    """Run the Dockerfile's own pyproject-to-requirements code for every FAISS value used."""
    (code,) = [c[2] for c in RUN_COMMANDS if c[:2] == ["python", "-c"] and "pyproject" in c[2]]
    variants = {ARGS["FAISS"]} | {s["build"]["args"]["FAISS"] for s in IMAGE_SERVICES.values()}
    assert variants == {"cpu", "gpu"}
    for variant in variants:
        out = subprocess.run([sys.executable, "-c", code, variant], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.splitlines()
        faiss = [r for r in out if r.startswith("faiss")]
        assert len(faiss) == 1, (variant, faiss)
        assert faiss[0].startswith("faiss-cpu" if variant == "cpu" else "faiss-gpu"), variant
        # and Ray, for the ray-head and ray-worker profiles
        others = [d for d in PYPROJECT["dependencies"] if not d.startswith("faiss")]
        others += PYPROJECT["optional-dependencies"]["ray"]
        assert sorted(set(out) - set(faiss)) == sorted(others), variant


# -- paths -----------------------------------------------------------------------------------

def test_alembic_runs_from_workdir():
    """`alembic upgrade head` in WORKDIR finds alembic.ini and its migrations in the image."""
    ini = (ROOT / "alembic.ini").read_text()
    assert re.search(r"^script_location = %\(here\)s/migrations$", ini, re.M)
    assert repo_path(WORKDIR / "alembic.ini") == ROOT / "alembic.ini"
    assert repo_path(WORKDIR / "migrations" / "env.py") == ROOT / "migrations" / "env.py"
    assert SERVICES["migrate"]["command"] == ["alembic", "upgrade", "head"]


def test_checkpoint_path_is_the_default_checkpoint():
    paths = {PurePosixPath(w) for s in IMAGE_SERVICES.values() for c in service_commands(s)
             for w in c if w.endswith(".pt")}
    assert paths, "no checkpoint path found"
    for path in paths:
        assert repo_path(path) == DEFAULT_CHECKPOINT, path
    if DEFAULT_CHECKPOINT.exists():
        rel = DEFAULT_CHECKPOINT.relative_to(REPO_ROOT).as_posix()
        assert not dockerignored(rel, dockerignore_patterns())


@pytest.mark.parametrize("name", sorted(IMAGE_SERVICES))
def test_service_paths_are_mounted_or_copied(name):
    service = IMAGE_SERVICES[name]
    targets = [PurePosixPath(t) for _, t, _ in mounts(service)]
    for command in service_commands(service):
        for word in command:
            path = PurePosixPath(word.split("=", 1)[-1])
            if not path.is_absolute() or path.suffix == ".pt":  # the checkpoint: test above
                continue
            mounted = any(path == t or t in path.parents for t in targets)
            assert mounted or (repo_path(path) or ROOT / "missing").exists(), (name, word)


def test_writable_volumes_exist_in_image_for_the_non_root_user():
    """A new named volume takes the owner of its mount point in the image."""
    made = {w for c in RUN_COMMANDS if c[0] == "mkdir" for w in c[1:] if w.startswith("/")}
    chowned = {w for c in RUN_COMMANDS if c[0] == "chown" for w in c[1:] if w.startswith("/")}
    assert [a for k, a in DOCKERFILE if k == "USER"] not in ([], ["root"])
    for name, service in IMAGE_SERVICES.items():
        for source, target, read_only in mounts(service):
            if is_named_volume(source) and not read_only:
                assert target in made, (name, target)
                assert any(target == c or target.startswith(c + "/") for c in chowned), target


# -- compose ---------------------------------------------------------------------------------

def test_depends_on_names_services():
    for name, service in SERVICES.items():
        assert set(service.get("depends_on", {})) <= set(SERVICES), name


def test_named_volumes_are_declared():
    declared = set(COMPOSE.get("volumes") or {})
    for name, service in SERVICES.items():
        for source, _, _ in mounts(service):
            assert not is_named_volume(source) or source in declared, (name, source)


def test_profiles():
    profiles = {p for s in SERVICES.values() for p in s.get("profiles", [])}
    assert profiles == {"indexer", "gpu", "ray-head", "ray-worker"}
    assert SERVICES["indexer"]["profiles"] == ["indexer"]


def test_ray_profiles_run_a_head_and_workers_from_the_service_image():
    """README "Archive scale": `ray start` on the head (GCS 6379, client 10001) and workers that
    join it by the compose name, from the image the API runs (Ray is in its requirements)."""
    head, worker = SERVICES["ray-head"], SERVICES["ray-worker"]
    assert head["profiles"] == ["ray-head"] and worker["profiles"] == ["ray-worker"]
    assert head["image"] == worker["image"] == SERVICES["api"]["image"]
    assert head["command"][:3] == ["ray", "start", "--head"] and "--block" in head["command"]
    assert "--port=6379" in head["command"] and "--ray-client-server-port=10001" in head["command"]
    assert worker["command"][:2] == ["ray", "start"] and "--block" in worker["command"]
    assert "--address=ray-head:6379" in worker["command"]  # RAY_HEAD unset: the head beside it
    assert ray_problems(["start", "--heda"])  # the check above can fail
    assert "127.0.0.1:10001:10001" in head["ports"]

    assert "index" in {s for s, t, ro in mounts(SERVICES["indexer"]) if not ro}


def test_db_has_volume_and_healthcheck():
    db = SERVICES["db"]
    assert any(is_named_volume(s) for s, _, _ in mounts(db))
    assert healthcheck_commands(db)[0][0] == "pg_isready"
    url = SERVICES["migrate"]["environment"][f"{ENV_PREFIX}DB_URL"]
    env = db["environment"]
    assert url == (f"postgresql+psycopg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}"
                   f"@db:5432/{env['POSTGRES_DB']}")


API_SERVICES = {n: s for n, s in IMAGE_SERVICES.items()
                if any(c[:2] == ["cbir", "serve"] for c in service_commands(s))}


@pytest.mark.parametrize("name", sorted(API_SERVICES))
def test_api_service(name):
    api, raw = API_SERVICES[name], COMPOSE_RAW["services"][name]
    assert api["depends_on"] == {"db": {"condition": "service_healthy"},
                                 "migrate": {"condition": "service_completed_successfully"}}
    assert urls(healthcheck_commands(api)) == [(PORT, "/readyz")]
    key = f"{ENV_PREFIX}API_KEY"
    assert re.fullmatch(rf"\$\{{{key}:\?.+\}}", raw["environment"][key])  # not interpolated
    for port in api["ports"]:
        host, _, container = port.rpartition(":")
        assert host.startswith("127.0.0.1:") and int(container) == PORT, port


def test_api_and_gpu_services_exist():
    assert {"api"} < set(API_SERVICES)
    gpu = {n for n, s in SERVICES.items() if "gpu" in s.get("profiles", [])}
    assert gpu and gpu <= set(API_SERVICES)
    ports = [p for s in API_SERVICES.values() for p in s["ports"]]
    assert len({p.rpartition(":")[0] for p in ports}) == len(ports), "host ports collide"


def test_gpu_profile_reserves_nvidia_devices():
    for name, service in SERVICES.items():
        if "gpu" not in service.get("profiles", []):
            continue
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
        assert service["build"]["args"]["FAISS"] in EXTRAS, name


def test_build_args_are_dockerfile_args_and_tags_match_them():
    images: dict[str, dict] = {}
    for name, service in IMAGE_SERVICES.items():
        args = service["build"].get("args", {})
        assert set(args) <= set(ARGS), name
        assert images.setdefault(service["image"], args) == args, f"{name}: same tag, other args"


def test_healthcheck_routes_answer_without_the_api_key(tmp_path):
    """The healthcheck sends no key: /readyz must answer it, 503 while nothing is loaded (the
    lifespan, which loads, does not run here), and /healthz 200."""
    if not module_exists("service.api.app"):
        pytest.skip("service/api/app.py (create_app) is not written yet")
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    app = create_app(Settings(_env_file=None, api_key="secret", index_dir=tmp_path))
    client = TestClient(app)  # not entered: no lifespan
    assert client.get("/healthz").status_code == 200
    for path in {p for s in SERVICES.values() for _, p in urls(healthcheck_commands(s))}:
        assert client.get(path).status_code == (503 if path == "/readyz" else 200), path
