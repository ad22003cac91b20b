"""The report's "How this run was set up": sentences made from this run's data, files and settings.

Why a module of its own: the report must say what *this* run did — which
rows each process saw and where they came from, which settings it ran with,
what happened to the cut-off site — for the bundled file and for a user's CSV
alike. Nothing here quotes an earlier run; the tuning history is in
docs/tuning.md.
"""

from __future__ import annotations

from typing import Any

from edge.personal import PersonalConfig
from fedline.demo import secure_aggregation
from fedline.demo.data import DemoData
from fedline.demo.workspace import Tuning, baseline_epochs, personal_table, split_live

SPLIT_WORDS = {
    "random": "at random (stratified by label for classification): the data says its rows are independent",
    "group": "by unit: whole values of the group column `{group}` go to one side, so no unit straddles training, "
    "validation and test",
    "time": "by time: the data has no group column and is taken as time-ordered, so the last rows are held out",
}
VALIDATION_WORDS = {
    "random": 'a hash of the row id (`[dataset] split = "random"`)',
    "group": 'a hash of the unit (`[dataset] group_column = "{group}"`)',
    "time": 'the newest rows (`[dataset] split = "time"`)',
}


def provenance(data: DemoData, t: Tuning, stored: dict[str, tuple[int, int]] | None = None) -> list[str]:
    """Exactly which rows each process saw, per site; ``stored``: the training and validation rows each agent
    held at the end (runner.stored_rows), said where they fall short of the rows it was sent."""
    out = []
    split = SPLIT_WORDS[data.split].format(group=data.group_column)
    val = VALIDATION_WORDS[data.split].format(group=data.group_column)
    for s in data.sites:
        history, live = split_live(s, t.live_fraction)
        held = int(data.validation_mask(s).sum())
        units = ""
        if data.group_column:
            test_units = sorted({r[data.group_column] for r in s.test_rows}, key=_num)
            units = f" (units {', '.join(test_units)})"
        out.append(
            f"Site {s.site} ({s.key}): {s.rows} rows. {len(s.test_rows)} test rows{units} never reach any process "
            f"and score every model. Its {len(s.train_rows)} training rows reach its edge agent: the first "
            f"{len(history)} (file order) replayed from `history.csv` by the agent's `csv` source, the last "
            f"{len(live)} served live by its simulated PLC from `live.csv` (Modbus TCP, over {t.plc_seconds:g} s), "
            f"which its line inference also scores. Of these the agent holds out {held} as validation rows "
            f"({val}); it trains on the other {len(s.train_rows) - held}."
            + _shortfall(s.train_rows, held, (stored or {}).get(s.site))
        )
    return [
        f"Test rows are chosen {split} (seed {data.seed}); each edge's validation rows are chosen the "
        "same way from the rows it receives (see each site).",
        *out,
    ]


def _shortfall(train_rows: Any, held: int, got: tuple[int, int] | None) -> str:
    """What the agent actually held, when it is fewer rows than it was sent (else nothing to add)."""
    if got is None or sum(got) >= len(train_rows):
        return ""
    n_train, n_val = got
    return (
        f" **Its agent held only {n_train + n_val} of them at the end ({len(train_rows) - n_train - n_val} fewer: "
        f"live rows its PLC served before the agent first read it, or after it stopped), {n_train} training and "
        f"{n_val} validation rows**: the live run's served model was picked and trained on those, while the "
        f"local-only column and the split study train on all {len(train_rows) - held}."
    )


def _num(text: str) -> Any:
    try:
        return (0, float(text))
    except ValueError:
        return (1, text)


def settings(data: DemoData, t: Tuning, batch_fraction: float, tunings: dict[str, Tuning]) -> list[str]:
    """The model, the federation's DP settings and the served-model rule this run used."""
    p = personal_table(t)
    batches = ", ".join(f"{site} {tt.batch_size}" for site, tt in tunings.items())
    return [
        "Features are normalised by engineering ranges "
        + (
            "from the register map (firmware_adapters/maps/ai4i2020.toml)"
            if not data.ranges_from_data
            else "derived from the pooled file with a 5 % margin (a real deployment writes the machine's ranges into the "
            "site file; deriving them from data leaks a little and is done here only for convenience)"
        )
        + ".",
        f"Model: MLP {len(data.features)}→{'→'.join(map(str, t.hidden))}→1, task {data.task}.",
        f"Federation: DP-SGD at every site with noise multiplier {t.noise_multiplier}, clip {t.max_grad_norm}, "
        f"budget ε={t.epsilon}, δ={t.delta:g}; each site's DP batch is {100 * batch_fraction:g} % of the rows it "
        f"trains on ({batches}); SGD lr {t.lr}, momentum {t.momentum}, {t.epochs} epochs per update, a round "
        + ("on every new global version, else every " if t.on_new_model else "every ")
        + f"{t.round_every_s:g} s; the aggregator runs FedBuff K={t.buffer_size} (a buffer short of K is reduced "
        f"{t.buffer_timeout_s:g} s after its first update), {t.staleness} staleness weighting (a = {t.staleness_a:g}), "
        f"max staleness {t.max_staleness}, until {t.versions} versions.",
        f'The served model (each site\'s `[personal] serve = "pick"`, edge/personal.py): on every new version each '
        f"edge fine-tunes the global model on its own training rows without noise ({p['finetune_epochs']} epochs, "
        f"lr {p['finetune_lr']}), keeps a local-only model trained on the same rows without noise "
        f"({p['local_epochs']} epochs, batch {p['batch_size']}, lr {p['local_lr']}, momentum {p['momentum']}), and "
        "hands its line its local-only model unless a one-sided paired test on its validation rows shows the "
        f"global or fine-tuned one better with p < {PersonalConfig.switch_alpha:g} (shared by the two: DeLong's test "
        "of the ROC AUC difference; for RMSE the squared-error difference with a standard error over the "
        "validation units, Student's t), then the better of those that pass; where the rows are too few to decide "
        f"(fewer than {PersonalConfig.min_validation_rows}, fewer than {PersonalConfig.min_validation_positives} of "
        f"the rarer class, or fewer than {PersonalConfig.min_validation_units} units) it says so, keeps local-only "
        f"if its training rows held at least {PersonalConfig.min_local_positives} of the rarer class (regression: "
        "units, each unit run to failure being one failure; it had enough to learn from, and nothing shows a "
        "federation candidate better) and otherwise runs the same paired test on its training rows as well, "
        f"each scored out of fold ({PersonalConfig.cross_folds} folds, whole units per fold where there is a group "
        "column; the local-only and fine-tuned candidates retrained without each fold; edge/unit_folds.py), pooled "
        "with its validation rows. "
        + (
            f"The fine-tune starts from the mean of the last {PersonalConfig.average_versions} global versions the "
            "edge adopted"
            + (", which is also the global candidate" if PersonalConfig.average_for == "both" else "")
            + " (edge/version_average.py: DP noise averaged out; computed at the plant from published models). "
            if PersonalConfig.average_versions > 1
            else ""
        )
        + "The site's "
        "status names the rule that decided. No candidate "
        "leaves the plant or feeds a DP round, so ε is the federation's alone.",
        f"Yardsticks (no DP, in-process, the edge's own code): local-only is the edge's local-only candidate "
        f"({baseline_epochs(t)} epochs on each site's training rows less its validation rows); central trains "
        "the same way on all sites' such rows pooled.",
    ]


def intermittent(site: str, cut: dict[str, Any], secure: bool = False) -> str:
    if cut.get("cut_at") is None:
        return f"Intermittent site {site}: the run ended before its link was cut."
    after = (
        "its agent trains only for a secure-aggregation cohort it joined, so it made no new updates meanwhile; an "
        "update it had masked for a cohort that closed while it was away is refused on reconnect with a signed "
        "'rejected' receipt (secagg_wrong_cohort), and it joins the next cohort."
        if secure
        else "its agent kept training into its outbox meanwhile and sent the backlog on reconnect, where the "
        "aggregator weighted it down by staleness (or dropped it, with a signed 'stale' receipt, past max staleness)."
    )
    return (
        f"Intermittent site {site}: its link to the broker (a TCP proxy) was cut at {cut.get('cut_at')} s and "
        f"restored at {cut.get('restored_at')} s (global versions {cut.get('version_at_cut')} to "
        f"{cut.get('version_at_restore')} were made without it); " + after
    )


def run_notes(
    data: DemoData,
    t: Tuning,
    batch_fraction: float,
    tunings: dict[str, Tuning],
    site: str,
    cut: dict[str, Any],
    broker_desc: str,
    stored: dict[str, tuple[int, int]] | None = None,
) -> list[str]:
    """Every note of the report, in order (``stored``: each agent's training and validation rows at the end)."""
    secure = secure_aggregation.enabled(t.secure_aggregation, len(data.sites))
    return [
        *provenance(data, t, stored),
        *settings(data, t, batch_fraction, tunings),
        secure_aggregation.note(secure, len(data.sites)),
        intermittent(site, cut, secure),
        f"Broker: {broker_desc}.",
        "How these defaults were chosen: docs/tuning.md.",
    ]
