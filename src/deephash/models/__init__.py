"""Networks: the seed's nets, backbones by name, heads, and RetrievalModel."""

from deephash.models.backbones import BasicBlock, FMnistCNN, ResNetCifar, SeedCNN, timm_backbone
from deephash.models.heads import ClassifierHead, EmbeddingHead, HashHead, IdentityHead, Normalize, sign_codes
from deephash.models.posterior_codes import posterior_path_codes
from deephash.models.registry import create_backbone, list_backbones, register_backbone
from deephash.models.retrieval_model import SPEC_DEFAULTS, RetrievalModel, build_model, model_spec
from deephash.models.seed import ClassificationNet, EmbeddingNet, EmbeddingNetL2, SiameseNet, TripletNet

__all__ = [
    "BasicBlock",
    "ClassificationNet",
    "ClassifierHead",
    "EmbeddingHead",
    "EmbeddingNet",
    "EmbeddingNetL2",
    "FMnistCNN",
    "HashHead",
    "IdentityHead",
    "Normalize",
    "ResNetCifar",
    "RetrievalModel",
    "SPEC_DEFAULTS",
    "SeedCNN",
    "SiameseNet",
    "TripletNet",
    "build_model",
    "create_backbone",
    "list_backbones",
    "model_spec",
    "posterior_path_codes",
    "register_backbone",
    "sign_codes",
    "timm_backbone",
]
