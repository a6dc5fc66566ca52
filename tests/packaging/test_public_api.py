"""The seed document's names, and the retrieval tool's, are importable from the top package."""

import pytest

import deephash

SEED_NAMES = (
    "SiameseMNIST TripletMNIST TripletCifar BalancedBatchSampler BalancedBatchSamplerCifar "
    "EmbeddingNet ClassificationNet SiameseNet TripletNet ContrastiveLoss TripletLoss "
    "OnlineContrastiveLoss OnlineTripletLoss PairSelector AllPositivePairSelector "
    "HardNegativePairSelector TripletSelector AllTripletSelector HardestNegativeTripletSelector "
    "RandomNegativeTripletSelector SemihardNegativeTripletSelector BatchHardTripletSelector fit "
    "AccumulatedAccuracyMetric AverageNonzeroTripletsMetric HashIndex"
).split()


@pytest.mark.parametrize("name", SEED_NAMES)
def test_seed_name_is_exported(name):
    assert name in deephash.__all__
    assert getattr(deephash, name) is not None


def test_cifar_sampler_is_the_same_sampler():
    assert deephash.BalancedBatchSamplerCifar is deephash.BalancedBatchSampler or issubclass(
        deephash.BalancedBatchSamplerCifar, deephash.BalancedBatchSampler
    )


def test_every_exported_name_resolves():
    for name in deephash.__all__:
        assert hasattr(deephash, name), name


def test_hashing_losses_are_registered_on_import():
    from deephash.losses import create_loss

    for name in ("dtsh", "dsh", "csq", "online-triplet", "online-contrastive"):
        assert name in __import__("deephash.losses", fromlist=["loss_names"]).loss_names()
    assert create_loss("csq", bits=16, n_classes=4).__class__.__name__ == "CSQLoss"


def test_names_load_lazily_and_unknown_ones_are_attribute_errors():
    import subprocess
    import sys

    script = ("import sys, deephash; before = 'torch' in sys.modules; deephash.HashIndex; "
              "print(before, 'torch' in sys.modules, deephash.runs.__name__, 'HashIndex' in dir(deephash))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False", "deephash.runs", "True"]  # the index needs no torch either
    with pytest.raises(AttributeError, match="module 'deephash' has no attribute 'no_such_name'"):
        deephash.no_such_name  # noqa: B018
    with pytest.raises(AttributeError, match="module 'deephash.data' has no attribute 'no_such_name'"):
        deephash.data.no_such_name  # noqa: B018
