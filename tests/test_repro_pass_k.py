"""`align repro pass-k`: the proving ground end to end on the tiny model (2 objectives), its resume, the arms'
recipe fields, the claims' verdicts and the command's input errors."""

import json

import pytest

from align.cli import main as align_main
from align.experiments import pass_k
from align.experiments.pass_k_report import check_claims


@pytest.mark.slow  # 70-140 s on 2 cores shared by 4 jobs
def test_pass_k_proving_ground_on_tiny_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pass-k"
    argv = ["repro", "pass-k", "--quick", "--model", tiny_model_dir, "--output-dir", str(out)]
    argv += ["--objectives", "grpo", "pkpo"]
    assert align_main(argv) == 0
    first = capsys.readouterr().out

    results = json.loads((out / "results.json").read_text())
    assert [(row["arm"], row["seed"]) for row in results["rows"]] == [("start", None), ("grpo", 0), ("pkpo", 0)]
    for row in results["rows"]:
        values = [row["exact"][f"pass@{n}"] for n in (1, 16, 256, 4096)]
        assert all(0.0 <= v <= 1.0 for v in values) and values == sorted(values)
        assert set(row["sampled"]) == {"pass@1", "pass@4"}  # --quick draws n = 4
    assert all(0.0 <= row["training"]["frac_reward_zero_std"] <= 1.0 for row in results["rows"][1:])
    (pkpo,) = [row for row in results["rows"] if row["arm"] == "pkpo"]
    assert set(pkpo["vs_grpo"]) == {"pass@1", "pass@16", "pass@256", "pass@4096"}
    assert pkpo["vs_grpo"]["pass@1"]["low"] <= pkpo["vs_grpo"]["pass@1"]["diff"] <= pkpo["vs_grpo"]["pass@1"]["high"]
    verdicts = {claim["claim"]: claim["verdict"] for claim in results["claims"]}
    assert verdicts["annealed PKPO keeps pass@1 close to GRPO's"] == "not tested"
    report = (out / "report.md").read_text()
    (pkpo_line,) = [line for line in report.splitlines() if line.startswith("| pkpo | 0 |")]
    assert pkpo_line.count("[") == 4  # an interval at each of the four N
    assert "## Claims" in report and "lower bound" in report
    assert (out / "pass-k.png").stat().st_size > 0
    for name in ("start", "grpo-s0", "pkpo-s0"):
        assert json.loads((out / "eval" / name / "exact" / "summary.json").read_text())["exact_coverage"]
    assert "start (exact coverage): pass@1" in first

    # The rerun trains, merges and generates nothing: every arm and evaluation on disk is reused.
    import align.evaluation.runs as runs
    import align.models as models
    import align.training as train

    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("a finished arm was trained again"))
    monkeypatch.setattr(runs, "get_backend", lambda *a, **k: pytest.fail("finished evaluations were regenerated"))
    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the start was merged again"))
    assert align_main(argv) == 0
    second = capsys.readouterr().out
    for name in ("warmup", "grpo-s0", "pkpo-s0"):
        assert f"reusing the finished run in {out.resolve() / 'train' / name}" in second
    assert "reusing the merged start model" in second
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
    assert "reusing" in second and "training problems:" in second

    # Tuning shares the warm-up, start and training problems, and scores validation problems, not the test ones.
    monkeypatch.undo()
    assert align_main([*argv, "--tune-lr", "1e-3"]) == 0
    tune = json.loads((out / "tune" / "results.json").read_text())
    assert [row["learning_rate"] for row in tune["rows"]] == ["start", "0.001"] and tune["chosen"] == "0.001"
    validation = {json.loads(line)["problem"] for line in (out / "tune" / "validation.jsonl").read_text().splitlines()}
    pool = {json.loads(line)["problem"] for line in (out / "train_pool.jsonl").read_text().splitlines()}
    test = {json.loads(line)["problem"] for line in (out / "test.jsonl").read_text().splitlines()}
    assert validation and not validation & pool and not validation & test
    assert "Chosen (highest validation pass@16): 0.001." in (out / "tune" / "report.md").read_text()


@pytest.mark.parametrize("size", [pass_k.ProvingGroundSize(), pass_k.QUICK], ids=["full", "quick"])
def test_every_arm_builds_a_valid_recipe(size, tmp_path):
    """Each arm's fields parse into its method's configs (k < K for passk_analytic, the schedule, batch = P x K)."""
    from align.training import default_recipe, parse_args

    for arm in pass_k.ARMS:
        train_file = tmp_path / "train.jsonl"
        method, fields = pass_k.arm_fields(arm, size, tmp_path / "start", train_file, "Answer.", seed=1)
        argv = ["--config", str(default_recipe(method)), "--output_dir", str(tmp_path / arm)]
        for key, value in fields.items():
            argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
        _, config, model = parse_args(method, argv)
        assert config.max_steps == size.steps and config.seed == 1 and config.learning_rate == size.learning_rate
        assert model.model_name_or_path == str(tmp_path / "start")
        assert fields["dataset_name"] == str(train_file)  # every arm trains on the same selected problems
        if method == "pass_n":
            assert config.per_device_train_batch_size == size.prompts_per_step * size.num_generations
            assert config.pass_k_objective == {"pkpo_anneal": "pkpo"}.get(arm, arm)
            if arm == "pkpo_anneal":
                assert config.pass_k_at(0) == size.pass_k and config.pass_k_at(size.steps - 1) == 1
        else:
            assert config.per_device_train_batch_size == size.prompts_per_step


def _cell(diff, low, high):
    return {"diff": diff, "low": low, "high": high}


def _comparisons(pass_1: dict, large: dict, gain=None) -> dict:
    comparisons = {"grpo_vs_start-s0": {"pass@1": gain or _cell(0.04, 0.02, 0.06)}}
    for arm in pass_1:
        # pass@4096 is saturated at the start (0.99999): a "significant" drop there must not decide claim 2
        saturated = _cell(-1e-6, -2e-6, -5e-7)
        comparisons[f"{arm}-s0"] = {"pass@1": pass_1[arm], "pass@16": large[arm], "pass@256": large[arm]}
        comparisons[f"{arm}-s0"]["pass@4096"] = saturated
    return comparisons


START = {"pass@1": 0.07, "pass@16": 0.37, "pass@256": 0.95, "pass@4096": 0.99999}  # the demo's CE model


def test_claims_read_the_intervals():
    arms = ["grpo", "pkpo", "pkpo_anneal"]
    pass_1 = {"pkpo": _cell(-0.05, -0.08, -0.02), "pkpo_anneal": _cell(-0.002, -0.01, 0.008)}
    large = {"pkpo": _cell(0.04, 0.01, 0.07), "pkpo_anneal": _cell(0.01, -0.01, 0.03)}
    claims = check_claims(_comparisons(pass_1, large), [0], arms, pass_k.ONLINE_ARMS, 0.02, START)
    assert [c["verdict"] for c in claims] == ["held on point estimates", "held", "not shown", "held"]
    # An arm significantly above GRPO at pass@1 refutes claim 1; one below it at large N refutes claim 2.
    pass_1["pkpo"] = _cell(0.05, 0.02, 0.08)
    large["pkpo_anneal"] = _cell(-0.03, -0.05, -0.01)
    claims = check_claims(_comparisons(pass_1, large), [0], arms, pass_k.ONLINE_ARMS, 0.02, START)
    assert [c["verdict"] for c in claims[:3]] == ["refuted", "held", "refuted"]
    assert "pkpo (seed 0)" in claims[0]["why"]
    # GRPO must raise pass@1 above the start for claim 1 to hold at all.
    pass_1["pkpo"] = _cell(-0.05, -0.08, -0.02)
    no_gain = _comparisons(pass_1, large, gain=_cell(0.01, -0.01, 0.03))
    assert check_claims(no_gain, [0], arms, pass_k.ONLINE_ARMS, 0.02, START)[0]["verdict"] == "not shown"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--objectives", "pkpo", "dco"], "including grpo"),
        (["--objectives", "grpo", "ppo"], "choose from"),
        (["--epochs", "2"], "belong to `align repro dco`"),
        (["--steps", "0"], "must be >= 1"),
        (["--learning-rate", "3"], "learning rates lie in (0, 1)"),
        (["--tune-lr", "1e-4", "0"], "learning rates lie in (0, 1)"),
    ],
)
def test_pass_k_rejects_bad_arguments(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        align_main(["repro", "pass-k", "--quick", "--output-dir", str(tmp_path), *flags])
    assert message in capsys.readouterr().err


def test_dco_rejects_pass_k_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        align_main(["repro", "dco", "--quick", "--output-dir", str(tmp_path), "--objectives", "grpo"])
    assert "belong to `align repro pass-k`" in capsys.readouterr().err
