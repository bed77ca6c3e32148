"""The confirmatory study's committed grids (docs/results/confirmatory/): they resolve, declare the
primary pair with its margins and 28 paired seeds, and contain the hybrid pre-registration's runs."""

from pathlib import Path

from tokentrust.study.compare import load_grid, part_runs, run_configs
from tokentrust.study.verdicts import DEFAULT_MARGINS, resolve_plan

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results"


def _runs(grid_file: str, tmp_path: Path) -> dict[tuple[str, int], dict]:
    spec = load_grid(file=str(DOCS / grid_file))
    out = {}
    for name, seed, cfg in run_configs(spec, tmp_path / spec["name"]):
        d = cfg.model_dump()
        d.pop("out_dir")
        out[(name, seed)] = d
    return out


def test_primary_pair_has_28_paired_seeds_and_declared_margins():
    spec = load_grid(file=str(DOCS / "confirmatory" / "grid.yaml"))
    plan = resolve_plan(spec, [m if isinstance(m, str) else m["name"] for m in spec["methods"]], "dppo-tv")
    assert plan.declared and set(plan.comparisons.values()) == {("av-freq-norm", "dppo-tv")}
    assert plan.margins == DEFAULT_MARGINS
    seeds = {m["name"]: m["seeds"] for m in spec["methods"] if isinstance(m, dict)}
    assert seeds["dppo-tv"] == seeds["av-freq-norm"] == list(range(2000, 2028))
    parts = [part_runs(spec, p) for p in spec["parts"]]
    every = {(m if isinstance(m, str) else m["name"], s) for m in spec["methods"]
             for s in (spec["seeds"] if isinstance(m, str) else m["seeds"])}
    assert set().union(*parts) == every and sum(map(len, parts)) == len(every) == 112  # each run in one part


def test_the_hybrid_preregistration_runs_are_runs_of_the_study(tmp_path):
    """Same (method, seed) -> same resolved config, so the hybrid test's runs are computed once."""
    study = _runs("confirmatory/grid.yaml", tmp_path)
    hybrid = _runs("hybrid-preregistration.grid.yaml", tmp_path)
    assert set(hybrid) <= set(study)
    for key, cfg in hybrid.items():
        assert cfg == study[key], key


def test_the_synchronous_arm_differs_only_in_the_regime(tmp_path):
    sync = _runs("confirmatory/sync.grid.yaml", tmp_path)
    study = _runs("confirmatory/grid.yaml", tmp_path)
    assert set(sync) == {(m, s) for m in ("dppo-tv", "av-freq-norm") for s in range(2000, 2008)}
    a, b = sync[("dppo-tv", 2000)], study[("dppo-tv", 2000)]
    assert a["rollout"]["staleness"] == 0 and b["rollout"]["staleness"] == 4
    assert a["algo"] == b["algo"] and a["task"] == b["task"] and a["model"] == b["model"]


def test_the_declared_secondary_family_is_the_preregistered_table():
    """S1-S9 of preregistration.md, as grid.yaml encodes them for the report."""
    from tokentrust.study.secondary import parse_family

    spec = load_grid(file=str(DOCS / "confirmatory" / "grid.yaml"))
    fam = {c.key: c for c in parse_family(spec["secondary"])}
    assert list(fam) == [f"S{i}" for i in range(1, 10)]
    pairs = {k: (c.method, c.baseline, c.metric, c.predict) for k, c in fam.items() if not c.doses}
    acc, unseen = "eval/greedy_pass@1", "coherence/unseen_token_share"
    assert pairs == {
        "S1": ("ppo", "dppo-tv", unseen, -1), "S3": ("av-hybrid", "av-freq-norm", acc, 0),
        "S4": ("av-hybrid", "av-freq-norm", unseen, -1), "S5": ("bandpo", "dppo-tv", acc, 0),
        "S6": ("dcpo", "dppo-tv", acc, 0), "S7": ("ppo", "dppo-tv", acc, 0), "S8": ("pg-is", "dppo-tv", acc, -1),
        "S9": ("av-freq-norm", "dppo-tv", acc, 0)}
    assert fam["S2"].doses == (("av-freq-inverse", -0.5), ("dppo-tv", 0.0), ("av-freq-norm", 0.5))
    assert fam["S2"].metric == "eval/acc_rare_answer" and fam["S2"].predict == -1
    assert all(fam[k].margin == 0.05 for k in ("S3", "S5", "S6", "S7", "S8", "S9"))
    assert fam["S9"].grid == "../confirmatory-sync" and all(c.grid is None for k, c in fam.items() if k != "S9")
