"""Classification and part-segmentation metrics against hand-computed cases."""

import math

import pytest
import torch

from cd2p.engine.metrics import (
    PartSegMeter,
    category_part_mask,
    classification_metrics,
    confusion_matrix,
    mean_class_accuracy,
    overall_accuracy,
    per_class_accuracy,
    plot_confusion_matrix,
    restrict_to_category,
    shape_part_ious,
)


def test_confusion_accuracy_and_mean_class_accuracy_by_hand():
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 0, 2, 2])
    conf = confusion_matrix(pred, target, 4)
    assert conf.tolist() == [[3, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]]
    assert overall_accuracy(conf) == pytest.approx(6 / 8)
    acc = per_class_accuracy(conf)
    assert acc[:3].tolist() == pytest.approx([0.75, 0.5, 1.0]) and math.isnan(acc[3])
    # Class 3 never occurs in the ground truth: it does not count in mAcc.
    assert mean_class_accuracy(conf) == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert classification_metrics(pred, target, 4) == pytest.approx({"oa": 0.75, "macc": 0.75})


def test_confusion_matrix_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="target holds class ids outside"):
        confusion_matrix(torch.tensor([0]), torch.tensor([5]), 3)


def test_shape_part_iou_counts_parts_absent_from_both_as_one():
    # Category parts 4, 5, 6; part 6 is in neither prediction nor truth.
    target = torch.tensor([4, 4, 4, 5, 5, 5])
    pred = torch.tensor([4, 4, 5, 5, 5, 5])
    ious = shape_part_ious(pred, target, [4, 5, 6])
    # part 4: |{0,1}| / |{0,1,2}| = 2/3; part 5: |{3,4,5}| / |{2,3,4,5}| = 3/4; part 6: 1.
    assert ious.tolist() == pytest.approx([2 / 3, 3 / 4, 1.0])
    # A part predicted but absent from the truth scores 0 (not 1).
    wrong = shape_part_ious(torch.tensor([6, 4]), torch.tensor([4, 4]), [4, 6])
    assert wrong.tolist() == [0.5, 0.0]


def test_partseg_meter_instance_and_class_miou_by_hand():
    meter = PartSegMeter(category_parts=[[0, 1], [2, 3, 4]], category_names=["Mug", "Lamp"])
    # Two mugs: perfect (1.0); then part 0: pred {0,1,2} truth {0} -> 1/3, part 1: pred {3}
    # truth {1,2,3} -> 1/3.
    pred = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]])
    target = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    meter.update(pred, target, torch.tensor([0, 0]))
    # One lamp without part 4 anywhere: parts 2 (1/1), 3 (2/3), 4 (absent: 1) -> (1+2/3+1)/3.
    meter.update(torch.tensor([[2, 3, 3, 3]]), torch.tensor([[2, 2, 3, 3]]), torch.tensor([1]))
    # Part 2: pred {0}, truth {0,1} -> 1/2; part 3: pred {1,2,3}, truth {2,3} -> 2/3.
    lamp = (0.5 + 2 / 3 + 1.0) / 3
    mug = [1.0, 1 / 3]
    per_cat = meter.per_category()
    assert per_cat["Mug"] == pytest.approx(sum(mug) / 2) and per_cat["Lamp"] == pytest.approx(lamp)
    metrics = meter.compute()
    assert metrics["instance_miou"] == pytest.approx((sum(mug) + lamp) / 3)
    assert metrics["class_miou"] == pytest.approx((sum(mug) / 2 + lamp) / 2)
    assert metrics["accuracy"] == pytest.approx(9 / 12)


def test_restrict_to_category_never_predicts_another_categorys_part():
    mask = category_part_mask([[0, 1], [2, 3]], 4)
    logits = torch.tensor([[[0.0, 1.0, 5.0, 0.0]], [[9.0, 0.0, 1.0, 2.0]]])  # (B=2, N=1, P=4)
    pred = restrict_to_category(logits, torch.tensor([0, 1]), mask)
    assert pred.tolist() == [[1], [3]]  # the global argmax (2 and 0) belongs to the other one


def test_confusion_png_is_written(tmp_path):
    conf = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2)
    path = plot_confusion_matrix(conf, ["a", "b"], tmp_path / "cm.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_partseg_meter_reports_per_part_and_per_category_iou():
    from cd2p.engine.metrics import PartSegMeter

    meter = PartSegMeter([[0, 1], [2, 3, 4]], ["mug", "lamp"])
    # mug shape: part 0 right on 2 of 3 points, part 1 half right; lamp: all right, part 4 absent
    meter.update(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 0, 0, 1]]), torch.tensor([0]))
    meter.update(torch.tensor([[2, 3, 3, 2]]), torch.tensor([[2, 3, 3, 2]]), torch.tensor([1]))
    parts = {(r["category"], r["part"]): r["iou"] for r in meter.per_part()}
    assert parts == {("mug", 0): 2 / 3, ("mug", 1): 1 / 2,
                     ("lamp", 2): 1.0, ("lamp", 3): 1.0, ("lamp", 4): 1.0}  # fmt: skip
    assert meter.per_category() == {"mug": (2 / 3 + 1 / 2) / 2, "lamp": 1.0}
