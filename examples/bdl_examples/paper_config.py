"""Generator configurations in the layout of the implicit-VI paper's published files.

The paper (Uppal et al., NeurIPS 2023) released its generators as YAML files of four
mappings; ``generator_from_config`` builds the library's ``MMGenerator`` or
``MultiHeadMMGenerator`` from one (``yaml.safe_load(open(path))`` reads it). Only the
paper's program (``examples/implicit_vi_paper/train.py``, through ``bdl_examples.paper``)
reads such files, so the layout lives here rather than in the library. The library's
generator modules do not check their arguments: the checks of this module are the only ones,
and every error names the malformed entry and the accepted form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

import implicit_vi as ivi

__all__ = ["generator_from_config", "generator_size"]


def generator_size(generator: nn.Module) -> int:
    """The number of parameters of a generator module (from shapes only: nothing is
    initialised or compiled).

    Example (the paper's generator for an MLP 784-400-400-10 on MNIST):
      >>> import implicit_vi as ivi
      >>> generator_size(ivi.MMGenerator((40, 40), (420, 420), 2, (957, 500)))
      3130380
    """
    noise = jax.ShapeDtypeStruct((1, *generator.noise_shape), np.float32)
    return ivi.count_params(jax.eval_shape(generator.init, jax.random.key(0), noise))


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


_CONFIG_MAPPINGS = ("input shapes", "output shapes", "hidden shapes", "numbers of hidden layers")
_CONFIG_FORM = (
    "a list of four mappings: input shapes {noise_input: [a, b], gen1: [a, b], ...}, output "
    "shapes {gen1: [a, b], ...}, hidden shapes {gen1: [a, b], ...} (optionally with "
    "second_layer: [[a1, b1], [a2, b2]]), numbers of hidden layers {gen1: n, ...}"
)


def _short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_shape(name: str, shape: Any) -> tuple[int, int]:
    try:
        shape = tuple(shape)
    except TypeError:
        shape = None
    if (
        shape is None
        or len(shape) != 2
        or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in shape)
    ):
        raise ValueError(
            f"{name} must be a matrix shape [a, b] of positive integers, got {shape!r}"
        )
    return int(shape[0]), int(shape[1])


def _head_number(where: str, key: Any, also_accepted: str = "") -> int:
    """K for a head key ``"genK"`` (K >= 1, no leading zeros); a clear error otherwise."""
    digits = key[3:] if isinstance(key, str) and key.startswith("gen") else ""
    if digits.isdigit() and digits.isascii() and not digits.startswith("0"):
        return int(digits)
    raise ValueError(
        f"{where}: unknown key {key!r}; the accepted keys are {also_accepted}gen1, gen2, ... "
        "(one per head)"
    )


def _trunk_from(name: str, value: Any, allow_empty: bool = False) -> tuple[tuple[int, int], ...]:
    try:
        shapes = tuple(value)
    except TypeError:
        shapes = None
    if shapes is None or (len(shapes) != 2 and not (allow_empty and not shapes)):
        accepted = " (or [] for no trunk)" if allow_empty else ""
        raise ValueError(
            f"{name} must be two matrix shapes [[a1, b1], [a2, b2]]{accepted}, got "
            f"{_short_repr(value)}"
        )
    return tuple(_check_shape(f"{name}[{i}]", s) for i, s in enumerate(shapes))


def generator_from_config(
    config: Sequence[Mapping[str, Any]],
    *,
    trunk_shapes: Sequence[Sequence[int]] | None = None,
    activation: Callable[[jax.Array], jax.Array] = nn.elu,
) -> nn.Module:
    """Builds an MM generator from a configuration file in the paper's published layout.

    The layout (``yaml.safe_load(open(path))`` returns it) is a list of four mappings:

    1. input shapes: ``noise_input: [a, b]`` (the noise matrix) and one ``genK: [a, b]`` per
       head, the shape of the head's input;
    2. output shapes: ``genK: [a, b]``, each head's output matrix;
    3. hidden shapes: ``genK: [a, b]``, each head's hidden matrices, and optionally
       ``second_layer: [[a1, b1], [a2, b2]]``, the shared trunk: an MM layer noise -> (a1, b1)
       and one (a1, b1) -> (a2, b2), each followed by the activation;
    4. numbers of hidden layers: ``genK: n``, each head's hidden -> hidden layers.

    Heads run in the order of K (gen2 before gen10). Files without ``second_layer`` were
    written for code whose trunk was fixed in the source: pass that trunk as
    ``trunk_shapes``, or ``trunk_shapes=[]`` for a single head ``gen1`` that reads the noise
    itself (input shape = ``noise_input``), which is a plain ``MMGenerator``.

    Returns:
      A ``ivi.MultiHeadMMGenerator`` (or an ``ivi.MMGenerator`` without trunk) with the
      published generator's parameter count (``generator_size``).

    Raises:
      ValueError: naming the malformed entry and the accepted form.

    Example (two heads; in a file this is four YAML mappings, ``- noise_input: [8, 8] ...``):
      >>> from bdl_examples.paper_config import generator_from_config, generator_size
      >>> config = [
      ...     {"noise_input": [8, 8], "gen1": [4, 8], "gen2": [4, 8]},
      ...     {"gen1": [20, 10], "gen2": [5, 10]},
      ...     {"gen1": [16, 16], "gen2": [8, 8], "second_layer": [[16, 16], [8, 8]]},
      ...     {"gen1": 1, "gen2": 1},
      ... ]
      >>> gen = generator_from_config(config)
      >>> gen.output_size, generator_size(gen)
      (250, 4378)

    References:
      Uppal et al., NeurIPS 2023, section 4 and appendix (generator configurations).
    """
    if (
        isinstance(config, (str, bytes, Mapping))
        or not isinstance(config, Sequence)
        or len(config) != 4
        or not all(isinstance(part, Mapping) for part in config)
    ):
        raise ValueError(
            f"config must be the published layout, {_CONFIG_FORM} (as yaml.safe_load reads "
            f"the file), got {_short_repr(config)}"
        )
    where = [f"config[{i}] ({name})" for i, name in enumerate(_CONFIG_MAPPINGS)]
    inputs, _, hidden, n_hidden = config
    if "noise_input" not in inputs:
        raise ValueError(f"{where[0]} has no noise_input: [a, b], the noise matrix's shape")
    heads = [key for key in inputs if key != "noise_input"]
    heads.sort(key=lambda key: _head_number(where[0], key, "noise_input, "))
    if not heads:
        raise ValueError(f"{where[0]} names no head: add gen1: [a, b], the first head's input")
    for i, mapping in enumerate(config[1:], start=1):
        extra = "second_layer" if i == 2 else None
        for key in mapping:
            if key != extra and key not in heads:
                _head_number(where[i], key, "second_layer, " if extra else "")
                raise ValueError(
                    f"{where[i]} has {key!r} but {where[0]} has no input shape for it: every "
                    "head genK needs an entry in each of the four mappings"
                )
        missing = [key for key in heads if key not in mapping]
        if missing:
            raise ValueError(
                f"{where[i]} has no entry for {missing}: every head genK needs an entry in "
                "each of the four mappings"
            )

    def shapes(i: int) -> tuple[tuple[int, int], ...]:
        return tuple(_check_shape(f"{where[i]}[{key!r}]", config[i][key]) for key in heads)

    noise_shape = _check_shape(f"{where[0]}['noise_input']", inputs["noise_input"])
    input_shapes, output_shapes, hidden_shapes = shapes(0), shapes(1), shapes(2)
    counts = tuple(_check_count(f"{where[3]}[{key!r}]", n_hidden[key], 0) for key in heads)

    if "second_layer" in hidden:
        if trunk_shapes is not None:
            raise ValueError(
                f"{where[2]} defines the trunk (second_layer); trunk_shapes is for files "
                "without it and must be left out"
            )
        trunk = _trunk_from(f"{where[2]}['second_layer']", hidden["second_layer"])
    elif trunk_shapes is None:
        raise ValueError(
            f"{where[2]} has no second_layer: the file was written for code whose shared trunk "
            "was fixed in the source. Pass the trunk as generator_from_config(config, "
            "trunk_shapes=[[a1, b1], [a2, b2]]) (MM layers noise -> [a1, b1] -> [a2, b2]), or "
            "trunk_shapes=[] for a single head gen1 that reads the noise itself"
        )
    else:
        trunk = _trunk_from("trunk_shapes", trunk_shapes, allow_empty=True)

    if not trunk:
        if len(heads) != 1 or input_shapes[0] != noise_shape:
            raise ValueError(
                "trunk_shapes=[] (no trunk) needs a single head gen1 whose input shape equals "
                f"noise_input {list(noise_shape)}; got heads {heads} with input shapes "
                f"{[list(s) for s in input_shapes]}"
            )
        head = (hidden_shapes[0], counts[0], output_shapes[0])
        return ivi.MMGenerator(noise_shape, *head, activation)
    available = math.prod(trunk[1])
    needed = sum(math.prod(s) for s in input_shapes)
    if needed > available:
        raise ValueError(
            f"{where[0]}: the heads' input shapes take {needed} trunk outputs but the trunk's "
            f"output {list(trunk[1])} has only {available}"
        )
    return ivi.MultiHeadMMGenerator(
        noise_shape, trunk, input_shapes, hidden_shapes, output_shapes, counts, None, activation
    )
