"""The `peeraid` report table: a row per model, a column per attack, and every attack on AutoAttack's own
images where AutoAttack ran on fewer (so that the figures compare on the same images)."""

from __future__ import annotations

from peeraid_client.cli import job_summary, per_class_table, report_table


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


def test_a_job_shows_its_sample_and_the_students_accuracy_per_class():
    job = {
        "id": "job_1",
        "status": "succeeded",
        "phase": "succeeded",
        "dataset": "textures",
        "spec": {"method": "peeraid", "student": "small_cnn", "epochs": 30},
        "result": {
            "student": {
                "best_epoch": 22,
                "test": {"clean_acc": 0.6, "autoattack_acc": 0.4},
                "test_per_class": {"clean_acc": {"brick": 0.9, "grass": 0.3}, "autoattack_acc": {"brick": 0.7, "grass": 0.1}},
            }
        },
        "evaluation": {
            "images": {"clean_acc": 40, "autoattack_acc": 20},
            "sample": {
                "test_images": 200,
                "method": "class-stratified sample",
                "seed": 0,
                "per_class": {"evaluated": {"brick": 20, "grass": 20}},
            },
        },
    }
    rows = per_class_table(job).splitlines()
    assert rows[0].split() == ["class", "images", "clean", "autoattack"]
    assert rows[1].split() == ["brick", "20", "90.0%", "70.0%"] and rows[2].split() == ["grass", "20", "30.0%", "10.0%"]
    text = job_summary(job)
    assert "(class-stratified sample of the 200 test images, seed 0)" in text and "student, per class:" in text
    assert per_class_table({"result": {"student": {"test": {}}}}) == ""
