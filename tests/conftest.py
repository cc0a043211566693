"""Session-scoped fixtures shared by several test files. Each fixture is small and says what it builds."""
import pytest


@pytest.fixture(scope="session")
def rl_toy(tmp_path_factory):
    """PPO/DPO toy (tests/rl_toy.py): a nano SFT model answering a colour question with one of ten colours,
    an untrained reward checkpoint on it, and the prompts; about 10 s on one thread."""
    from rl_toy import build_rl_toy
    return build_rl_toy(tmp_path_factory.mktemp("rl_toy"))
