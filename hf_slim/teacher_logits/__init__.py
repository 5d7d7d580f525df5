"""An offline teacher: its top-k distributions written once to disk ([`write_teacher_logits`],
`hf-slim teacher-logits`) and read back by the distillation trainer ([`TeacherLogitsReader`]), so no teacher model
sits in training memory. See `docs/distillation.md` ("Offline teacher")."""

from .layerwise import LayerwiseTeacher, layerwise_final_hidden
from .store import META_FILE, TeacherLogitsReader, tokenizer_fingerprint
from .writer import prepare_rows, write_teacher_logits


__all__ = [
    "META_FILE", "LayerwiseTeacher", "TeacherLogitsReader", "layerwise_final_hidden", "prepare_rows",
    "tokenizer_fingerprint", "write_teacher_logits",
]  # fmt: skip
