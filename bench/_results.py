"""Shared by the bench scripts: print a result table and keep it in bench/results/."""
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def publish(name, text):
    """Print ``text`` and write it to bench/results/<name>.md. Example: ``publish("recovery", table)``."""
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(text + "\n")
