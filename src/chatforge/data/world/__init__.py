"""The tiny world: real facts, a generated data set for every stage, and the gold labeler that measures."""
from chatforge.data.world.facts import World
from chatforge.data.world.generate import SIZES, generate_world
from chatforge.data.world.labeler import GoldLabeler, Score, is_refusal

__all__ = ["World", "SIZES", "generate_world", "GoldLabeler", "Score", "is_refusal"]
