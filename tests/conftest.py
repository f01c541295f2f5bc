"""Shared fixtures."""

from __future__ import annotations

import importlib

import pytest
import torch


@pytest.fixture(scope="session")
def timm():
    """timm, importable here although there is no CPU torchvision.

    The registry's torchvision is a CUDA build whose ops library fails to load with CPU torch;
    its Python side then registers fake kernels for ``torchvision::nms``/``qnms`` and fails
    because the schemas are missing. Defining the two schemas first lets ``import timm`` work
    (timm's models never call those ops). Only the tests import timm.
    """
    lib = torch.library.Library("torchvision", "DEF")  # kept alive by the fixture frame
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    module = importlib.import_module("timm")
    yield module
