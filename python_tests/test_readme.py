"""Every README code block marked ```python runnable runs as written, so the README cannot rot."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runnable_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.findall(r"```python runnable\n(.*?)```", text, flags=re.S)


def test_readme_has_runnable_blocks():
    assert runnable_blocks()


def test_readme_runnable_blocks_run(tmp_path):
    for i, code in enumerate(runnable_blocks()):
        script = tmp_path / f"block{i}.py"
        script.write_text(code)
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert out.returncode == 0, f"README block {i} failed:\n{out.stderr}"


def shell_commands():
    """Every command line of the README's ```bash blocks (backslash continuations joined, comments dropped)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_readme_smtc_commands_parse():
    """Each `smtc ...` (and `torchrun ... -m smtc_fast.cli ...`) line of the README is accepted by the CLI as written:
    every subcommand and option it names exists (the paths are the user's, so they are not opened)."""
    import shlex

    from smtc_fast import cli

    checked = 0
    for line in shell_commands():
        argv = shlex.split(line)
        if argv[0] == "smtc":
            argv = argv[1:]
        elif argv[0] == "torchrun" and "smtc_fast.cli" in argv:
            argv = argv[argv.index("smtc_fast.cli") + 1:]
        else:
            continue
        cli.build_parser(argv).parse_args(argv)
        checked += 1
    assert checked >= 8


def test_readme_make_targets_exist():
    with open(os.path.join(ROOT, "Makefile")) as f:
        targets = set(re.findall(r"^([a-z][\w-]*):", f.read(), flags=re.M))
    for line in shell_commands():
        if line.startswith("make "):
            assert line.split()[1] in targets, line
