"""`infini train`: passkey retrieval (passkey.py) and continual language-model training (lm.py)."""

import click

from .lm import train_lm
from .passkey import train_passkey


@click.group()
def train():
    """Train models."""


train.add_command(train_passkey)
train.add_command(train_lm)
