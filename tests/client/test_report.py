"""The `peeraid` report table: a row per model, a column per attack, and every attack on AutoAttack's own
images where AutoAttack ran on fewer (so that the figures compare on the same images)."""

from __future__ import annotations

from peeraid_client.cli import report_table


def test_the_report_shows_every_attack_on_autoattacks_images():
    result = {
        "student": {
            "best_epoch": 7,
            "test": {"clean_acc": 0.6, "pgd20_acc": 0.41, "autoattack_acc": 0.39},
            "test_on_autoattack_images": {"clean_acc": 0.62, "pgd20_acc": 0.43, "autoattack_acc": 0.39},
        },
        "swa_student": {"best_epoch": 8, "test": {"clean_acc": 0.61, "pgd20_acc": 0.4}},
    }
    lines = report_table(result).splitlines()
    assert lines[0].split() == ["model", "epoch", "clean", "pgd20", "autoattack"]
    rows = {line.split("  ")[0].strip(): line.split() for line in lines[1:] if not set(line) <= {"-", " "}}
    assert rows["student"][-3:] == ["60.0%", "41.0%", "39.0%"]
    assert rows["student (AutoAttack's images)"][-3:] == ["62.0%", "43.0%", "39.0%"]
    assert "swa_student (AutoAttack's images)" not in rows
