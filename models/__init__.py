"""`build_model(args) -> (model, criterion, postprocessors)`, as in the original."""
from models.detr import build


def build_model(args):
    return build(args)
