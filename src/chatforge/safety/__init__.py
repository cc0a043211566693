"""Safety: the moderation classifier that screens what goes into and out of the assistant."""
from chatforge.safety.moderation import ModerationResult, Moderator

REFUSAL = "Sorry, I can't help with that. If you or someone else is in danger, please contact local emergency services."

__all__ = ["Moderator", "ModerationResult", "REFUSAL"]
