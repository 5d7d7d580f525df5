"""An offline teacher: its top-k distributions written once to disk ([`write_teacher_logits`],
`hf-slim teacher-logits`) and read back by the distillation trainer ([`TeacherLogitsReader`]), so no teacher model
sits in training memory. See `docs/distillation.md` ("Offline teacher")."""

from .store import META_FILE, TeacherLogitsReader, tokenizer_fingerprint
from .writer import prepare_rows, write_teacher_logits


__all__ = ["META_FILE", "TeacherLogitsReader", "prepare_rows", "tokenizer_fingerprint", "write_teacher_logits"]
