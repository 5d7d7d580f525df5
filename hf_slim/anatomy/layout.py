"""The stored layout of a family: how checkpoints name and split the model's tensors.

transformers models hold each layer's routed experts fused (`mlp.experts.gate_up_proj [E, 2I, H]`,
`mlp.experts.down_proj [E, H, I]`), but `save_pretrained` writes the Hub layout, one tensor per expert and
projection (`mlp.experts.{e}.gate_proj.weight`, ...), and some families rename modules on disk (Mixtral's
`block_sparse_moe`). A [`StoredLayout`] declares that mapping per family (the `stored_layout` field of
[`ArchSpec`]); `hf_slim.checkpoints` reads and writes checkpoints through it. Names here are relative to a block
(`model.layers.N`); names outside the blocks are stored unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["ExpertStack", "StoredLayout", "IDENTITY_LAYOUT"]

_EXPERT = "{expert}"


@dataclass(frozen=True)
class ExpertStack:
    """A fused experts tensor of the model that checkpoints store as one tensor per expert and part.

    The fused tensor is the stack over experts (dim 0) of each expert's parts laid back to back along `dim`: for
    `gate_up_proj`, expert `e` holds its gate rows, then its up rows.

    Args:
        model (`str`): block-relative model name, e.g. `"mlp.experts.gate_up_proj"`.
        stored (`tuple[str, ...]`): block-relative stored names, one per part, with `{expert}` standing for the
            expert number, e.g. `("mlp.experts.{expert}.gate_proj.weight", "mlp.experts.{expert}.up_proj.weight")`.
        dim (`int`, defaults to 1): the fused tensor's dim holding the parts (dim `dim - 1` of a stored tensor).
    """

    model: str
    stored: tuple[str, ...]
    dim: int = 1
    _patterns: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.stored or any(s.count(_EXPERT) != 1 for s in self.stored):
            raise ValueError(f"ExpertStack {self.model!r}: every stored name needs one {_EXPERT} placeholder")
        if self.dim < 1:
            raise ValueError(f"ExpertStack {self.model!r}: dim={self.dim} must be >= 1 (dim 0 is the expert axis)")
        patterns = tuple(
            re.compile("".join(re.escape(piece) if i % 2 == 0 else r"(\d+)" for i, piece in enumerate(_split(s))))
            for s in self.stored
        )
        object.__setattr__(self, "_patterns", patterns)

    def stored_name(self, expert: int, part: int) -> str:
        """The block-relative stored name of one expert's part."""
        return self.stored[part].replace(_EXPERT, str(expert))

    def match(self, stored: str) -> tuple[int, int] | None:
        """`(expert, part)` when `stored` (block-relative) is one of this stack's tensors, else `None`."""
        for part, pattern in enumerate(self._patterns):
            m = pattern.fullmatch(stored)
            if m is not None:
                return int(m.group(1)), part
        return None


def _split(template: str) -> list[str]:
    before, after = template.split(_EXPERT)
    return [before, _EXPERT, after]


@dataclass(frozen=True)
class StoredLayout:
    """How checkpoints of a family name and split the model's tensors (what `save_pretrained` writes and
    `from_pretrained` reads back).

    Args:
        renames (`tuple[tuple[str, str], ...]`): `(model prefix, stored prefix)` pairs on block-relative names,
            first match wins (Mixtral: `("mlp.", "block_sparse_moe.")`).
        expert_stacks (`tuple[ExpertStack, ...]`): fused expert tensors stored per expert; their stored names are
            written in full (renames do not apply to them).

    The default layout stores every name unchanged (SlimMoe).
    """

    renames: tuple[tuple[str, str], ...] = ()
    expert_stacks: tuple[ExpertStack, ...] = ()

    def stack_for(self, relative: str) -> ExpertStack | None:
        """The [`ExpertStack`] storing the block-relative model name `relative`, if it is stored split."""
        return next((s for s in self.expert_stacks if s.model == relative), None)

    def to_stored(self, relative: str) -> str:
        """The stored name of a block-relative model name that is stored whole."""
        for model, stored in self.renames:
            if relative.startswith(model):
                return stored + relative[len(model) :]
        return relative

    def from_stored(self, relative: str) -> tuple[str, int | None, int | None]:
        """`(block-relative model name, expert, part)` of a block-relative stored name; `expert` and `part` are
        `None` for a tensor stored whole."""
        for stack in self.expert_stacks:
            hit = stack.match(relative)
            if hit is not None:
                return stack.model, hit[0], hit[1]
        for model, stored in self.renames:
            if relative.startswith(stored):
                return model + relative[len(stored) :], None, None
        return relative, None, None


#: Every tensor stored under its model name (the SlimMoe family).
IDENTITY_LAYOUT = StoredLayout()
