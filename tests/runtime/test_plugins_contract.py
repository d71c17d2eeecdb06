"""The stage plugin contract and its discovery: every installed stage is documented and has an
exportable schema; configs are validated with field paths; entry-point loading is idempotent and
survives a broken plugin; a third-party package installed with pip adds a stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from internlm2.plugins import registry
from internlm2.plugins.contract import (
    MemoryChannel,
    Stage,
    StageCancelled,
    StageConfig,
    StageConfigError,
    StageContext,
    StageInputs,
    local_context,
)
from internlm2.plugins.runtime.pipeline import validate_pipeline

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
OURS = ("prepare_data", "pretrain", "sft")
BUILTIN = (*OURS, "reward_model", "dpo", "ppo", "long_context", "eval")


def test_builtin_stages_load_through_entry_points_idempotently():
    stages = registry.load_stages()
    assert set(OURS) <= set(stages)
    assert registry.load_stages() == stages  # cached: same objects, no rescan side effects
    assert registry.load_stages(reload=True).keys() == stages.keys()
    for name in OURS:
        assert stages[name].version == "0.1.0"  # from the internlm2-platform distribution
    from importlib.metadata import entry_points

    registered = {ep.name: ep.value for ep in entry_points(group=registry.ENTRY_POINT_GROUP)}
    for name in BUILTIN:  # built-ins are registered exactly like third-party plugins
        assert registered[name] == f"internlm2.plugins.stages.{name}:STAGE"


def test_every_loaded_stage_is_documented_with_an_exportable_schema():
    """Fails when a stage lacks a description, a run docstring, a config docstring or any field
    description, or when its JSON Schema cannot be exported."""
    stages = registry.load_stages()
    problems = [p for s in stages.values() for p in s.documentation_problems()]
    assert problems == []
    for info in registry.stage_infos():
        schema = json.loads(json.dumps(info["config_schema"]))
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        assert info["queue"] == "gpu" and info["description"]


def test_documentation_check_catches_missing_docs():
    class Bare(StageConfig):
        x: int = 1

    def run(ctx):
        return None

    problems = Stage(name="bare", description="", config_model=Bare, run=run).documentation_problems()
    assert any("description" in p for p in problems)
    assert any("run() has no docstring" in p for p in problems)
    assert any("Bare has no docstring" in p for p in problems)
    assert "bare.config.x: no description" in problems


def test_config_errors_name_the_field_path():
    stage = registry.get_stage("sft")
    with pytest.raises(StageConfigError) as err:
        stage.parse_config({"data": "d.jsonl", "lr": 0, "betas": [0.9], "launch": {"nproc_per_node": 0}},
                           prefix="stages[3].config")
    fields = {f for f, _ in err.value.errors}
    assert {"stages[3].config.lr", "stages[3].config.betas[1]", "stages[3].config.launch.nproc_per_node"} <= fields
    with pytest.raises(StageConfigError, match=r"^config: must be an object"):
        stage.parse_config(["not", "a", "dict"])
    parsed = stage.parse_config({"data": "d.jsonl"})
    assert parsed.zero_stage == 2 and parsed.launch.nproc_per_node == 1
    defaults = stage.default_config()
    assert "data" not in defaults and defaults["betas"] == [0.9, 0.95] and defaults["launch"]["launcher"] == "auto"


def test_validate_pipeline_names_steps_and_checks_references():
    plan = validate_pipeline([
        {"stage": "prepare_data", "config": {"sources": ["a.jsonl"]}},
        {"stage": "pretrain", "config": {"data": "stage:prepare_data/dataset"}},
        {"stage": "pretrain", "config": {"model": "stage:pretrain"}},
    ])
    assert [p.name for p in plan] == ["prepare_data", "pretrain", "pretrain-2"]
    with pytest.raises(StageConfigError) as err:
        validate_pipeline([{"stage": "pretrain", "name": "x"}, {"stage": "pretrain", "name": "x"},
                           {"stage": "pretrain", "config": {"model": "stage:later"}, "extra": 1}],
                          inputs={"weights": {}})
    fields = {f for f, _ in err.value.errors}
    assert fields == {"stages[1].name", "stages[2].config.model", "stages[2].extra", "inputs.weights"}


def test_context_reports_cancels_and_resolves(tmp_path):
    class Cfg(StageConfig):
        """A test config."""

    def run(ctx: StageContext):
        """A test stage."""

    stage = Stage(name="probe", description="a probe stage", config_model=Cfg, run=run)
    (tmp_path / "prev" / "final").mkdir(parents=True)
    (tmp_path / "base").mkdir()
    from internlm2.plugins.contract import ArtifactKind, ArtifactRef, StageOutput

    prev = StageOutput("sft", "sft", tmp_path / "prev",
                       {"final": ArtifactRef("final", ArtifactKind.CHECKPOINT, tmp_path / "prev" / "final")})
    ctx = local_context(stage, {}, tmp_path / "out",
                        inputs=StageInputs(checkpoints={"base": tmp_path / "base"}, previous=(prev,)))
    assert ctx.resolve("stage:sft") == tmp_path / "prev" / "final"
    assert ctx.resolve("input:base") == tmp_path / "base"
    assert ctx.resolve_model(None) == tmp_path / "prev" / "final"  # newest earlier checkpoint wins
    with pytest.raises(FileNotFoundError):
        ctx.resolve("stage:sft/missing")
    ctx.report_progress(3, 4, loss=1.5)
    assert ctx.channel.of_type("progress")[0]["fraction"] == 0.75
    assert ctx.channel.of_type("metrics")[0]["values"] == {"loss": 1.5}
    assert ctx.latest_checkpoint() is None
    (ctx.checkpoint_dir / "step-2").mkdir(parents=True)
    ctx.commit_checkpoint("step-2")
    assert ctx.latest_checkpoint() == ctx.checkpoint_dir / "step-2"
    ctx.raise_if_cancelled()
    ctx.channel.cancel()
    with pytest.raises(StageCancelled):
        ctx.raise_if_cancelled()
    # Other ranks report nothing.
    quiet = StageContext(job_id="j", name="probe", stage="probe", index=0, config=Cfg(), inputs=StageInputs(),
                         output_dir=tmp_path / "r1", channel=MemoryChannel(), rank=1, world_size=2)
    quiet.report_progress(1, 2, loss=1.0)
    quiet.log("x")
    assert quiet.channel.events == []


def test_a_broken_plugin_does_not_hide_the_others(tmp_path):
    dist = tmp_path / "broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[internlm2.stages]\nbroken = no_such_module:STAGE\nmisnamed = internlm2.plugins.stages.sft:STAGE\n")
    code = ("from internlm2.plugins.registry import load_stages, load_errors;"
            "import json; s = load_stages(); print(json.dumps([sorted(s), load_errors()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}, check=True)
    names, errors = json.loads(out.stdout.strip().splitlines()[-1])
    assert "sft" in names and "broken" not in names and "misnamed" not in names
    assert "ModuleNotFoundError" in errors["broken"]
    assert "exposes a stage named 'sft'" in errors["misnamed"]


def test_third_party_package_installed_with_pip_adds_a_stage(tmp_path):
    """``pip install`` of plugins/example_stage (into a private target dir, not the shared venv)."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "plugins" / "example_stage", src,
                    ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, timeout=120)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a b", "c d e", "a b"]))
    code = textwrap.dedent(f"""
        import json
        from internlm2.plugins.registry import get_stage, load_stages
        from internlm2.plugins.contract import local_context
        stage = get_stage("corpus_stats")
        assert not stage.documentation_problems(), stage.documentation_problems()
        try:  # the third party's schema is enforced like a built-in's
            stage.parse_config({{"data": []}}, prefix="stages[0].config")
        except Exception as exc:
            assert exc.field == "stages[0].config.data", exc
        else:
            raise AssertionError("empty data accepted")
        ctx = local_context(stage, {{"data": [{str(corpus)!r}]}}, {str(tmp_path / "out")!r})
        print(json.dumps([sorted(load_stages()), stage.version, stage.run(ctx)]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(target)}, check=True)
    names, version, result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "corpus_stats" in names and set(OURS) <= set(names)
    assert version == "0.1.0"
    assert result == {"documents": 3.0, "characters": 11.0, "words": 7.0, "duplicates": 1.0,
                      "median_chars": 3.0, "max_chars": 5.0}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["duplicates"] == 1
