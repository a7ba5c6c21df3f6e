"""Write tests/data/model_reference_logits.json: each architecture's logits on a seeded input with
seeded weights, in train and eval mode. Run once (`python -m tests.make_model_references`) and
commit the file; rerun only for an intended change to a forward pass, and say so in the commit."""

import json

from .test_model_forward import REFERENCE_ARCHITECTURES, REFERENCE_FILE, reference_logits


def main() -> None:
    references = {name: reference_logits(name) for name in REFERENCE_ARCHITECTURES}
    REFERENCE_FILE.parent.mkdir(exist_ok=True)
    REFERENCE_FILE.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in references.items()) + "\n}\n")
    print(f"wrote {REFERENCE_FILE} ({', '.join(references)})")


if __name__ == "__main__":
    main()
