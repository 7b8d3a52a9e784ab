"""No config value reaches a shell (issue #22, item 1).

Every command line and script distgrow generates that a shell reads is built here for a table
of hostile values, in every config key that reaches it, and parsed by a real shell:

* DeepSpeed's pdsh runner (several nodes): the line is built by DeepSpeed 0.19.8's own
  ``deepspeed.launcher.runner.main`` (``subprocess.Popen`` caught), joined as pdsh joins it for
  the remote shell, checked with ``bash -n`` and run by ``sh`` with a stub interpreter that
  records the argv it receives;
* the SLURM chain's batch scripts (``launch.slurm=chain``) and the ``slurm/distgrow.sbatch``
  wrapper, run by ``bash`` with a stub interpreter; the ``#SBATCH`` lines read by a port of
  sbatch's own line parser, and (integration, slurm/local_cluster.sh) by a real sbatch;
* horovodrun's lines: ``ssh HOST ...`` (Horovod's own ``get_remote_command``) and the host
  discovery script, which horovodrun runs through a shell.

Each hostile value either is refused with one line naming it (config validation: exit 2) or
arrives as one word; every test checks that nothing ran (no ``pwned`` file anywhere under its
directory). ``test_the_harness_sees_an_injection`` shows that the harness does catch one: the
line DeepSpeed builds for an unchecked master address runs its ``touch``.
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from distgrow import cli
from distgrow.config import ConfigError, config_from_dict
from distgrow.launch.builders import (
    LaunchError,
    LaunchSpec,
    build_deepspeed,
    build_horovodrun,
    check_deepspeed_remote_line,
)
from distgrow.launch.job import hostfile_hosts
from distgrow.launch.slurm_chain import (
    check_chain,
    sbatch_options,
    sbatch_word,
    span_overrides,
    span_script,
    span_shape,
    submit_span,
)
from distgrow.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]

# What an attacker would put in a value that some launcher pastes into a shell line. Each
# would create a file named pwned* in the shell's directory if it ran.
INJECTIONS = [
    "h1;touch${IFS}pwned;#",  # the issue's own: launch.master_addr under deepspeed, 2 nodes
    "h1;touch pwned",
    "$(touch pwned)",
    "`touch pwned`",
    "h1|touch pwned",
    "h1&&touch pwned",
    "h1>pwned",
    "h1\ntouch pwned",
    "h1\rtouch pwned",
    "'; touch pwned; '",
    '"; touch pwned; "',
    "-oProxyCommand=touch pwned",  # an option to ssh, not a host
    "h1 touch pwned",
    "fe80::1%eth0;touch pwned",  # an IPv6 scope that Python's ipaddress accepts
    "h1\\;touch pwned",
    "",
]
# Values a shell would misread without quoting (words, globs, quotes), each harmless itself.
AWKWARD = [
    "a  b   c",
    "/data/[ab]*",
    "it's",
    '"quoted" \\back \\\\two `tick` $HOME ${HOME}',
    "tab\there",
    "!x && exit 3 | >out <in",
    "#not a comment",
    "",
]
# pdsh's own codes (%h the node, %u the user, %n its rank, %% a %) and % signs it leaves.
PERCENT = ["%h %u %n", "lr%5", "100%%", "%n%", "runs/%%h%j"]
# Host names and addresses a cluster really uses: accepted, and they arrive as one word.
HOSTS = ["10.0.0.1", "node-01.cluster_a", "n1", "::1", "fe80::1%eth0", "localhost"]

STUB = """#!/bin/sh
# Records the argv it was given (NUL-separated) and the PYTHONPATH it saw.
printf '%s\\0' "$@" > "$STUB_LOG"
printf '%s' "$PYTHONPATH" > "$STUB_LOG.pythonpath"
"""


def stub(path: Path) -> Path:
    """An executable that records its argv in ``$STUB_LOG`` and does nothing else."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STUB)
    path.chmod(0o755)
    return path


def recorded(log: Path) -> list[str]:
    return log.read_bytes().decode().split("\0")[:-1]


def nothing_ran(root: Path) -> None:
    assert not [str(p) for p in root.rglob("pwned*")], "a hostile value ran as a command"


def bash_parses(text: str) -> None:
    done = subprocess.run(["bash", "-n", "-c", text], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def slurm_arguments(line: str) -> list[str]:
    """The words sbatch takes from an ``#SBATCH`` line (after ``#SBATCH``), as SLURM's
    ``_get_argument`` (``src/sbatch/opt.c``, the older form) reads them: split at whitespace
    outside double quotes, a backslash takes the next character as it is, an unescaped ``#``
    ends the line (even inside quotes). The real sbatch: test_real_sbatch_reads_...
    """
    words: list[str] = []
    i = 0
    while True:
        while i < len(line) and line[i].isspace():
            i += 1
        word: list[str] = []
        escaped = quoted = False
        while i < len(line) and (quoted or not line[i].isspace()):
            char = line[i]
            if escaped:
                escaped = False
                word.append(char)
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = not quoted
            elif char == "#":
                break
            else:
                word.append(char)
            i += 1
        if not word:
            return words
        words.append("".join(word))


def sbatch_reads(line: str) -> list[str]:
    assert line.startswith("#SBATCH ")
    return slurm_arguments(line[8:])


def chain_cfg(**chain: Any) -> Any:
    return config_from_dict(
        {"launch": {"slurm": "chain", "chain": chain}, "growth": {"max_workers": 4}}
    )


# --------------------------------------------------------------------------------------------
# Config validation: a value that is not what it claims to be is refused (one line, exit 2)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", INJECTIONS)
def test_master_addr_must_be_a_host_name_or_an_address(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"launch": {"master_addr": value}})
    line = str(err.value)
    assert line.startswith(f"launch.master_addr = {value!r}: is not a host name or an IP")
    assert "Fix: " in line and "\n" not in line
    with pytest.raises(LaunchError, match="is not a host name or an IP address"):
        LaunchSpec(workers=2, config="c.yaml", master_addr=value)


@pytest.mark.parametrize("value", HOSTS)
def test_real_host_names_and_addresses_are_accepted(value: str) -> None:
    assert config_from_dict({"launch": {"master_addr": value}}).launch.master_addr == value
    assert LaunchSpec(workers=2, config="c.yaml", master_addr=value, hosts=(value,)).hosts


def test_the_issues_command_ends_with_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("growth: {max_workers: 4}\n")
    argv = ["launch", "c.yaml", "launch.master_addr=h1;touch${IFS}pwned;#"]
    code = cli.main([*argv, "launch.launcher=deepspeed", "launch.nodes=2", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "launch.master_addr = 'h1;touch${IFS}pwned;#': is not a host name" in err
    assert len(err.splitlines()) == 1, err
    nothing_ran(tmp_path)


@pytest.mark.parametrize("port", [0, -1, 65536, 2**40])
def test_master_port_must_be_a_port(port: int) -> None:
    with pytest.raises(ConfigError, match=f"launch.master_port = {port}: not a port"):
        config_from_dict({"launch": {"master_port": port}})
    with pytest.raises(LaunchError, match="is not a port"):
        LaunchSpec(workers=2, config="c.yaml", master_port=port)


@pytest.mark.parametrize("key", ["time", "partition", "account"])
@pytest.mark.parametrize("value", [*INJECTIONS[:-1], "gpu\n#SBATCH --wrap=id", "1:00:00 x"])
def test_chain_values_follow_slurms_grammar(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        chain_cfg(**{key: value})
    line = str(err.value)
    assert line.startswith(f"launch.chain.{key} = {value!r}: is not a SLURM ")
    assert "\n" not in line


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("time", "04:00:00"),
        ("time", "2-00:00:00"),
        ("time", "90"),
        ("time", "30:00"),
        ("time", "1-12"),
        ("time", "UNLIMITED"),
        ("partition", "gpu"),
        ("partition", "gpu-long,debug"),
        ("account", "proj_a.b"),
    ],
)
def test_slurm_values_clusters_use_are_accepted(key: str, value: str) -> None:
    assert getattr(chain_cfg(**{key: value}).launch.chain, key) == value


@pytest.mark.parametrize("arg", ["--mem=0\n#SBATCH --wrap=id", "--x=\x1b[2J", "mem=0", ""])
def test_sbatch_args_are_options_without_control_characters(arg: str) -> None:
    with pytest.raises(ConfigError, match=r"^launch\.chain\.sbatch_args = ") as err:
        chain_cfg(sbatch_args=[arg])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [v for v in INJECTIONS if v and not any(c.isspace() for c in v)])
def test_hostfile_hosts_must_be_host_names(value: str, tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"n1 slots=2\n{value} slots=2\n")
    with pytest.raises(LaunchError, match="is not a host name or an IP address") as err:
        hostfile_hosts(str(hostfile))
    assert "\n" not in str(err.value)
    hostfile.write_text("n1 slots=2\nnode-2:4\n10.0.0.3\n")
    assert hostfile_hosts(str(hostfile)) == ("n1", "node-2", "10.0.0.3")


@pytest.mark.parametrize("value", INJECTIONS)
def test_launch_spec_refuses_a_host_that_is_not_one(value: str) -> None:
    with pytest.raises(LaunchError, match="is not a host name"):
        LaunchSpec(workers=2, config="c.yaml", nodes=2, hosts=("n1", value))


# --------------------------------------------------------------------------------------------
# DeepSpeed's pdsh runner: the remote line, rebuilt by DeepSpeed itself
# --------------------------------------------------------------------------------------------


def deepspeed_remote_line(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, python: Path
) -> tuple[list[str], str]:
    """What DeepSpeed 0.19.8's ``runner.main`` hands pdsh for ``argv`` (a deepspeed launch),
    and the one line pdsh gives every node's remote shell (its words joined by spaces)."""
    runner = pytest.importorskip("deepspeed.launcher.runner", reason="needs deepspeed")
    multinode = pytest.importorskip("deepspeed.launcher.multinode_runner")
    caught: list[list[str]] = []

    class Popen:
        returncode = 0

        def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
            caught.append(cmd)

        def wait(self) -> int:
            return 0

    with monkeypatch.context() as m:
        m.setattr(runner.subprocess, "Popen", Popen)
        m.setattr(runner.subprocess, "check_call", lambda *a, **k: 0)  # its ssh check
        m.setattr(runner.signal, "signal", lambda *a: None)
        m.setattr(multinode.PDSHRunner, "backend_exists", lambda self: True)
        m.setattr(sys, "executable", str(python))  # the runner's own interpreter
        m.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        runner.main(argv[3:])  # after `python -m deepspeed.launcher.runner`
    (cmd,) = caught
    assert cmd[:5] == ["pdsh", "-S", "-f", "1024", "-w"]
    return cmd, " ".join(cmd[6:])


def pdsh_rewrites(line: str, host: str = "node-1", user: str = "u", rank: int = 0) -> str:
    """The remote command line as pdsh 2.34 hands it on (``-R ssh`` and ``-R exec``): ``%h``,
    ``%u``, ``%n`` and ``%%`` replaced, left to right; other ``%`` kept
    (test_pdsh_rewrites_as_the_real_pdsh_does)."""
    codes = {"h": host, "u": user, "n": str(rank), "%": "%"}
    return re.sub("%([hun%])", lambda code: codes[code.group(1)], line)


def run_remote(line: str, cwd: Path, log: Path) -> None:
    """The node's shell: ``sh -c LINE`` (as ssh runs a remote command), after pdsh's rewriting."""
    line = pdsh_rewrites(line)
    bash_parses(line)
    env = {"PATH": os.environ["PATH"], "STUB_LOG": str(log)}
    done = subprocess.run(["sh", "-c", line], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("master_addr", HOSTS)
def test_deepspeed_remote_line_gives_every_value_as_one_word(
    master_addr: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work, remote = tmp_path / "work", tmp_path / "remote"
    remote.mkdir()
    python = stub(tmp_path / "bin" / "python")
    (work / "hosts").parent.mkdir(parents=True, exist_ok=True)
    (work / "hosts").write_text("node-1 slots=2\nnode_2 slots=2\n")
    monkeypatch.chdir(work)
    monkeypatch.setenv("PYTHONPATH", "/opt/lib")
    config = str(work / "my configs" / "c [1];x %h.yaml")
    overrides = tuple(f"run.name={v}" for v in [*INJECTIONS, *AWKWARD, *PERCENT])
    spec = LaunchSpec(
        workers=4,
        nodes=2,
        config=config,
        overrides=overrides,
        resume=True,
        python=str(python),
        hostfile="hosts",
        master_addr=master_addr,
        master_port=29611,
    )
    argv, _ = build_deepspeed(spec)
    cmd, line = deepspeed_remote_line(argv, monkeypatch, python)
    assert cmd[5] == "node-1,node_2"
    run_remote(line, remote, tmp_path / "argv")
    got = recorded(tmp_path / "argv")
    # DeepSpeed's own words (plain ones: --world_info is base64), then the worker command.
    own = cmd[cmd.index(str(python)) + 1 : cmd.index("distgrow")]
    assert own[:3] == ["-u", "-m", "deepspeed.launcher.launch"]
    assert {"--node_rank=%n", f"--master_addr={master_addr}", "--master_port=29611"} <= set(own)
    own = [pdsh_rewrites(word) for word in own]  # its --node_rank=%n: the node's rank
    assert got == [*own, "distgrow", "train", config, *overrides, "run.resume=true"]
    # The runner's exports: PYTHONPATH with the working directory first; `cd` went there.
    assert (tmp_path / "argv.pythonpath").read_text() == f"{work}:/opt/lib"
    nothing_ran(tmp_path)


def test_the_harness_sees_an_injection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the check, DeepSpeed's line runs the issue's master address as a command."""
    work = tmp_path / "work"
    work.mkdir()
    python = stub(tmp_path / "bin" / "python")
    (work / "hosts").write_text("node-1 slots=1\nnode-2 slots=1\n")
    monkeypatch.chdir(work)
    argv, _ = build_deepspeed(
        LaunchSpec(workers=2, nodes=2, config="c.yaml", python=str(python), hostfile="hosts")
    )
    argv = [a.replace("127.0.0.1", "h1;touch${IFS}pwned;#") for a in argv]
    _, line = deepspeed_remote_line(argv, monkeypatch, python)
    run_remote(line, work, tmp_path / "argv")
    assert (work / "pwned").exists()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PYTHONPATH", "/x/$(touch pwned)"),
        ("PYTHONSTARTUP", "`touch pwned`"),
        ("NCCL_DEBUG", 'a"; touch pwned; "'),
        ("UCX_TLS", "tcp\\"),
    ],
)
def test_deepspeed_refuses_exported_variables_a_shell_would_read(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(LaunchError, match=rf"\${name} = .*unset it or remove them"):
        build_deepspeed(LaunchSpec(workers=4, nodes=2, config="c.yaml", hostfile="/h"))
    # One node: no remote shell, nothing to refuse.
    assert build_deepspeed(LaunchSpec(workers=2, config="c.yaml"))[0]


def test_deepspeed_refuses_a_deepspeed_env_line_a_shell_would_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DS_ENV_FILE", "ds.env")  # not a user's own ~/.deepspeed_env
    spec = LaunchSpec(workers=4, nodes=2, config="c.yaml", hostfile="/h")
    (tmp_path / "ds.env").write_text("NCCL_IB_HCA=mlx5_0\nUCX_TLS=tcp,self\n")
    assert build_deepspeed(spec)[0]
    (tmp_path / "ds.env").write_text("NCCL_IB_HCA=mlx5_0\nX=$(touch pwned)\n")
    with pytest.raises(LaunchError, match=r"X in .*ds\.env = '\$\(touch pwned\)\\n' holds"):
        build_deepspeed(spec)


def test_pdsh_rewrites_as_the_real_pdsh_does(tmp_path: Path) -> None:
    """The harness's pdsh_rewrites is what pdsh does to a remote command line (``-R exec`` runs
    it here, without ssh: the same rewriting as ``-R ssh``, which DeepSpeed uses)."""
    if shutil.which("pdsh") is None:
        pytest.skip("needs pdsh (Debian package pdsh) to check the harness's % rewriting")
    # (Not a % at the very end: pdsh -R exec reads past the word there.)
    line = "a%hb %u %n %% %%h %%%n %5 %j %H 50% end"
    done = subprocess.run(
        ["pdsh", "-R", "exec", "-w", "localhost", "echo", line],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    want = pdsh_rewrites(line, host="localhost", user=getpass.getuser(), rank=0)
    assert done.stdout == f"localhost: {want}\n"
    assert want == f"alocalhostb {getpass.getuser()} 0 % %h %0 %5 %j %H 50% end"


def test_real_pdsh_hands_every_percent_value_on_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepSpeed's remote line for overrides and a config path holding pdsh's codes, run by
    the real pdsh (``-R exec ... sh -c LINE``): the worker gets each value as it was."""
    if shutil.which("pdsh") is None:
        pytest.skip("needs pdsh (Debian package pdsh) to run DeepSpeed's remote line")
    work = tmp_path / "work"
    work.mkdir()
    python = stub(tmp_path / "bin" / "python")
    (work / "hosts").write_text("node-1 slots=1\nnode-2 slots=1\n")
    monkeypatch.chdir(work)
    config = str(work / "c%h %n.yaml")
    overrides = tuple(f"run.name={v}" for v in PERCENT)
    spec = LaunchSpec(
        workers=2, nodes=2, config=config, overrides=overrides, python=str(python),
        hostfile="hosts",
    )  # fmt: skip
    _, line = deepspeed_remote_line(build_deepspeed(spec)[0], monkeypatch, python)
    env = {"PATH": os.environ["PATH"], "STUB_LOG": str(tmp_path / "argv")}
    subprocess.run(
        ["pdsh", "-R", "exec", "-w", "localhost", "sh", "-c", line],
        cwd=work, env=env, capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    got = recorded(tmp_path / "argv")
    assert "--node_rank=0" in got  # pdsh did rewrite DeepSpeed's own %n
    assert got[got.index("distgrow") :] == ["distgrow", "train", config, *overrides]


@pytest.mark.parametrize(
    ("where", "value", "name"),
    [
        ("cwd", "/runs/%h", "the working directory"),
        ("python", "/opt/%n/python", "the interpreter"),
        ("PYTHONPATH", "/lib%%", "$PYTHONPATH"),
        ("NCCL_SOCKET_IFNAME", "%u", "$NCCL_SOCKET_IFNAME"),
        ("master_addr", "fe80::1%nic0", "launch.master_addr"),
    ],
)
def test_deepspeed_refuses_a_value_pdsh_would_rewrite(where: str, value: str, name: str) -> None:
    """What DeepSpeed writes into pdsh's line itself (distgrow cannot escape it) may not hold
    %h, %u, %n or %%; a % pdsh leaves (lr%5, 50%, an IPv6 scope %eth0) is accepted."""
    env = {"NCCL_X": "50%", "PYTHONPATH": "/lib%5"}
    ok: dict[str, Any] = {"python": "/usr/bin/python3", "cwd": "/work/lr%5", "env": env}
    check_deepspeed_remote_line(**ok, master_addr="fe80::1%eth0")
    args = {**ok, "master_addr": "10.0.0.1"}
    if where in ("cwd", "python", "master_addr"):
        args[where] = value
    else:
        args["env"] = {where: value}
    with pytest.raises(LaunchError) as err:
        check_deepspeed_remote_line(**args)
    message = str(err.value)
    shown = f"/work/lr%5:{value}" if where == "PYTHONPATH" else value  # the runner's export
    assert message.startswith(f"deepspeed on several nodes: {name} = {shown!r} holds '%")
    assert "which pdsh rewrites in every node's remote command line" in message
    assert "Fix: " in message and "\n" not in message


@pytest.mark.parametrize("path", ["/my dir/py", "/d/$(touch pwned)", "/d;x/py", "/d'/py"])
def test_deepspeed_refuses_a_path_it_would_paste_unquoted(path: str) -> None:
    with pytest.raises(LaunchError, match="the working directory .* writes it unquoted"):
        check_deepspeed_remote_line("/usr/bin/python3", path, {})
    with pytest.raises(LaunchError, match="the interpreter .* writes it unquoted"):
        check_deepspeed_remote_line(path, "/work", {})
    check_deepspeed_remote_line("/usr/bin/python3.11", "/work/run-1/a_b+c@d", {"PYTHONX": "a b"})


# --------------------------------------------------------------------------------------------
# The SLURM chain's batch scripts
# --------------------------------------------------------------------------------------------

AWKWARD_DIR = "runs/a b;touch pwned'$(touch pwned)\"`touch pwned`#x"


def span(tmp_path: Path, python: Path, overrides: list[str], **chain: Any) -> tuple[str, list[str]]:
    cfg = chain_cfg(**chain)
    run = tmp_path / AWKWARD_DIR
    shape = span_shape(4, cfg.launch.chain)
    options = sbatch_options(shape, cfg.launch.chain, "distgrow-x-1", run / "o-%j.out", run)
    words = span_overrides(overrides, resume=True)
    return span_script(1, options, str(python), str(run / "c f.yaml"), words), options


def test_span_script_gives_every_value_as_one_word(tmp_path: Path) -> None:
    python = stub(tmp_path / "bin" / "python")
    # (Values with control characters are refused: test_nothing_in_a_span_script_...)
    overrides = [f"data.root={v}" for v in [*INJECTIONS, *AWKWARD] if v.isprintable()]
    text, options = span(
        tmp_path,
        python,
        overrides,
        partition="gpu,debug",
        account="proj",
        time="2-00:00:00",
        sbatch_args=["--mem=0", "--comment=a b;touch pwned #x", "--constraint=a100|h100"],
    )
    lines = text.splitlines()
    sbatch = [line for line in lines if line.startswith("#SBATCH ")]
    assert [sbatch_reads(line) for line in sbatch] == [[o] for o in options]
    assert '#SBATCH "--comment=a b;touch pwned \\#x"' in lines
    assert "#SBATCH --nodes=1" in lines  # plain options stay as they are
    bash_parses(text)
    script = tmp_path / "span.sbatch"
    script.write_text(text)
    env = {"PATH": os.environ["PATH"], "STUB_LOG": str(tmp_path / "argv")}
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, check=True)
    assert recorded(tmp_path / "argv") == [
        "-m",
        "distgrow",
        "launch",
        str(tmp_path / AWKWARD_DIR / "c f.yaml"),
        *overrides,
        "launch.slurm=chain",
        "run.resume=true",
    ]
    nothing_ran(tmp_path)


@pytest.mark.parametrize(
    "option",
    ["--x=a b", '--x="q"', "--x=it's", "--x=#c", "--x=\\\\", '--x=" #"', "--x=a\\ b", "--x=é ü"],
)
def test_sbatch_word_reads_back_as_one_word(option: str) -> None:
    assert sbatch_reads(f"#SBATCH {sbatch_word(option)}") == [option]
    assert sbatch_reads(f"#SBATCH {sbatch_word(option)} # a comment") == [option]


@pytest.mark.parametrize("bad", ["\n", "\r", "\x0b", "\x1b", "\u2028", "\x85"])
def test_nothing_in_a_span_script_can_start_a_new_line(bad: str, tmp_path: Path) -> None:
    python = tmp_path / "py"
    with pytest.raises(LaunchError, match="holds control characters") as err:
        span(tmp_path, python, [f"data.root=/d{bad}touch pwned"])
    assert "\n" not in str(err.value)
    with pytest.raises(LaunchError, match="holds control characters"):
        span_script(1, ["--job-name=x", f"--output=/o{bad}id"], "/py", "/c.yaml", [])
    cfg = chain_cfg()
    object.__setattr__(cfg.run, "output_dir", f"runs/x{bad}touch pwned")
    with pytest.raises(LaunchError, match=r"^run\.output_dir = .* holds control characters"):
        check_chain(cfg)
    nothing_ran(tmp_path)


# --------------------------------------------------------------------------------------------
# slurm/distgrow.sbatch, the wrapper users submit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("restarts", ["0", "1"])
def test_sbatch_wrapper_passes_every_argument_as_one_word(restarts: str, tmp_path: Path) -> None:
    wrapper = REPO / "slurm" / "distgrow.sbatch"
    bash_parses(wrapper.read_text())
    python = stub(tmp_path / "bin" / "python")
    args = [str(tmp_path / "my configs" / "c;x.yaml"), *(f"run.name={v}" for v in INJECTIONS)]
    args += [f"data.root={v}" for v in AWKWARD]
    env = {
        "PATH": os.environ["PATH"],
        "STUB_LOG": str(tmp_path / "argv"),
        "DISTGROW_PYTHON": str(python),
        "SLURM_RESTART_COUNT": restarts,
    }
    done = subprocess.run(["bash", str(wrapper), *args], cwd=tmp_path, env=env, text=True,
                          capture_output=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    resume = ["run.resume=true"] if restarts == "1" else []
    assert recorded(tmp_path / "argv") == ["-m", "distgrow", "launch", *args, *resume]
    nothing_ran(tmp_path)


# --------------------------------------------------------------------------------------------
# horovodrun: ssh HOST ... and the host discovery script, both through a shell
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
def test_horovod_ssh_line_gets_the_host_as_one_word(host: str, tmp_path: Path) -> None:
    remote = pytest.importorskip("horovod.runner.util.remote", reason="needs horovod")
    ssh = stub(tmp_path / "bin" / "ssh")
    spec = LaunchSpec(workers=2, nodes=2, config="c.yaml", hosts=(host, "n2"))
    assert build_horovodrun(spec)[0][6:8] == ["-H", f"{host}:1,n2:1"]
    line = remote.get_remote_command(shlex.quote("true"), host=host)
    bash_parses(line)
    env = {"PATH": f"{ssh.parent}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "argv")}
    subprocess.run(["sh", "-c", line], cwd=tmp_path, env=env, check=True)
    got = recorded(tmp_path / "argv")
    assert got[got.index("StrictHostKeyChecking=no") + 1 :] == [host, "true"]
    nothing_ran(tmp_path)


@pytest.mark.integration
def test_horovod_discovery_script_path_is_one_shell_word(tmp_path: Path) -> None:
    script = tmp_path / AWKWARD_DIR / "launch" / "discover_hosts"
    script.parent.mkdir(parents=True)
    script.write_text('#!/bin/sh\necho ran > "$STUB_LOG"\n')
    script.chmod(0o755)
    spec = LaunchSpec(
        workers=2, config="c.yaml", elastic=True, max_workers=4, host_discovery_script=str(script)
    )
    argv, _ = build_horovodrun(spec)
    given = argv[argv.index("--host-discovery-script") + 1]
    # horovodrun: safe_shell_exec.execute(script) -> Popen(script, shell=True).
    env = {"PATH": os.environ["PATH"], "STUB_LOG": str(tmp_path / "ran")}
    subprocess.run(given, shell=True, cwd=tmp_path, env=env, check=True)
    assert (tmp_path / "ran").read_text() == "ran\n"
    nothing_ran(tmp_path)


def test_submitted_span_script_runs_the_configs_values_as_words(tmp_path: Path) -> None:
    """The script ``submit_span`` writes for a run whose directory and name are hostile."""
    python = stub(tmp_path / "bin" / "python")
    run_dir = tmp_path / AWKWARD_DIR
    cfg = config_from_dict(
        {
            "launch": {"slurm": "chain", "chain": {"partition": "gpu", "time": "1-00:00"}},
            "growth": {"max_workers": 4},
            "run": {"output_dir": str(run_dir), "name": "a;b $(touch pwned) `x`"},
        }
    )
    submitted: list[list[str]] = []

    def sbatch(argv: list[str], env: Any) -> subprocess.CompletedProcess[str]:
        submitted.append(list(argv))
        return subprocess.CompletedProcess(argv, 0, "4242\n", "")

    overrides = ["data.root=$(touch pwned)", "run.name=a;b $(touch pwned) `x`"]
    job = submit_span(
        cfg=cfg,
        run=RunDir(run_dir),
        workers=2,
        python=str(python),
        config_path=str(run_dir / "c.yaml"),
        overrides=overrides,
        resume=False,
        after="17",
        env={},
        chdir=run_dir,
        runner=sbatch,
        log=lambda line: None,
    )
    assert job is not None and job.job_id == "4242"
    (argv,) = submitted
    script = Path(argv[-1])
    assert argv == ["sbatch", "--parsable", "--dependency=afterok:17", str(script)]
    text = script.read_text()
    bash_parses(text)
    words = {w for line in text.splitlines() if line.startswith("#SBATCH ")
             for w in sbatch_reads(line)}  # fmt: skip
    assert {f"--chdir={run_dir}", f"--output={run_dir}/launch/span-01-%j.out"} <= words
    assert {"--partition=gpu", "--time=1-00:00"} <= words
    env = {"PATH": os.environ["PATH"], "STUB_LOG": str(tmp_path / "argv")}
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, check=True)
    got = recorded(tmp_path / "argv")
    assert got == [
        "-m",
        "distgrow",
        "launch",
        str(run_dir / "c.yaml"),
        *overrides,
        "launch.slurm=chain",
    ]
    nothing_ran(tmp_path)


def sbatch_wait(script: Path, env: dict[str, str]) -> str:
    """Submit ``script`` to the test cluster, wait for the job to end; its id (it succeeded)."""
    done = subprocess.run(
        ["sbatch", "--wait", "--parsable", str(script)],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


@pytest.mark.integration
def test_real_sbatch_reads_every_option_back_and_runs_the_span(
    slurm: dict[str, str], tmp_path: Path
) -> None:
    """SLURM's own sbatch (slurm/local_cluster.sh) reads each ``#SBATCH`` option of a span
    script as one word and runs its command with every value as one word."""
    python = stub(tmp_path / "bin" / "python")
    run = tmp_path / AWKWARD_DIR
    run.mkdir(parents=True)
    comment = 'a b;touch pwned #x "q" it\'s \\y $(touch pwned)'
    cfg = chain_cfg(sbatch_args=[f"--comment={comment}"])
    shape = span_shape(1, cfg.launch.chain)
    options = sbatch_options(shape, cfg.launch.chain, "distgrow-x-1", run / "o #1.out", run)
    overrides = ["data.root=$(touch pwned)", 'run.name=a "b" #c']
    script = tmp_path / "span.sbatch"
    script.write_text(span_script(1, options, str(python), "c.yaml", overrides))
    env = {**slurm, "STUB_LOG": str(tmp_path / "argv")}
    job = sbatch_wait(script, env)
    shown = subprocess.run(
        ["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    assert f"Comment={comment} " in shown, shown
    assert f"WorkDir={run}\n" in shown and f"StdOut={run}/o #1.out\n" in shown, shown
    assert recorded(tmp_path / "argv") == ["-m", "distgrow", "launch", "c.yaml", *overrides]
    assert (run / "o #1.out").exists()
    nothing_ran(tmp_path)


PERCENT_DIR = "runs/lr%5 %j %x %u %%"  # sbatch's filename patterns, and its escape itself


def test_span_output_keeps_percent_signs_literal(tmp_path: Path) -> None:
    """sbatch expands ``%j``, ``%x``, ``%%``... in ``--output``: a run directory holding ``%``
    is written with each doubled there (so the log lands at the run's own path), the file name's
    ``%j`` kept; ``--chdir``, which sbatch does not expand, as it is."""
    cfg = chain_cfg()
    run = tmp_path / PERCENT_DIR
    shape = span_shape(1, cfg.launch.chain)
    options = sbatch_options(shape, cfg.launch.chain, "distgrow-x-1", run / "span-%j.out", run)
    assert f"--output={tmp_path}/runs/lr%%5 %%j %%x %%u %%%%/span-%j.out" in options
    assert f"--chdir={run}" in options
    text = span_script(1, options, "/py", "c.yaml", [])
    assert f'#SBATCH "--output={tmp_path}/runs/lr%%5 %%j %%x %%u %%%%/span-%j.out"' in text


@pytest.mark.integration
def test_real_sbatch_writes_a_span_log_under_a_percent_directory(
    slurm: dict[str, str], tmp_path: Path
) -> None:
    """SLURM's own sbatch puts a span's log at the literal path under a run directory named
    with ``%`` codes, and runs the span there (``--chdir`` is not expanded)."""
    run = tmp_path / PERCENT_DIR
    run.mkdir(parents=True)
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text('#!/bin/sh\necho span-ran\npwd > "$STUB_LOG"\n')
    python.chmod(0o755)
    cfg = chain_cfg()
    shape = span_shape(1, cfg.launch.chain)
    options = sbatch_options(shape, cfg.launch.chain, "distgrow-x-1", run / "span-%j.out", run)
    script = tmp_path / "span.sbatch"
    script.write_text(span_script(1, options, str(python), "c.yaml", []))
    job = sbatch_wait(script, {**slurm, "STUB_LOG": str(tmp_path / "cwd")})
    landed = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.out"))
    assert landed == [f"{PERCENT_DIR}/span-{job}.out"]
    assert (run / f"span-{job}.out").read_text() == "span-ran\n"
    assert (tmp_path / "cwd").read_text() == f"{run}\n"


@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun", "horovodrun"])
def test_a_hostfile_launch_refuses_a_host_that_is_not_one(
    launcher: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith(("SLURM_", "OMPI_", "PMI_"))]:
        monkeypatch.delenv(name)
    (tmp_path / "c.yaml").write_text("growth: {max_workers: 4}\n")
    (tmp_path / "hosts").write_text("n1 slots=2\n-oProxyCommand=touch${IFS}pwned slots=2\n")
    backend = "horovod" if launcher == "horovodrun" else "torch"
    code = cli.main(
        ["launch", "c.yaml", f"launch.launcher={launcher}", "launch.nodes=2",
         "launch.hostfile=hosts", f"backend.name={backend}", "--dry-run"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "'-oProxyCommand=touch${IFS}pwned' is not a host name or an IP address" in err
    assert len(err.splitlines()) == 1, err
    nothing_ran(tmp_path)
