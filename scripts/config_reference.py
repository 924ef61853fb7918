"""Print the README's config reference table from the config dataclasses (the single source)."""

from yolo_resume.config import field_docs


def main() -> None:
    print("| key | type | default | meaning |")
    print("|---|---|---|---|")
    for key, type_name, default, doc in field_docs():
        shown = '""' if default == "" else default
        print(f"| `{key}` | {type_name} | `{shown}` | {doc.replace('|', '/')} |")


if __name__ == "__main__":
    main()
