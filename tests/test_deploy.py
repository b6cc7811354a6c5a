"""deploy/: the EC2 stack (linted, then created in moto and read back), its host helper, the Slurm script.

Both launch paths are checked for both layouts: Ape-X (dqn, rainbow, iqn: a replay server beside the
learner, actors push experience) and the asynchronous family (config.ASYNC_ALGOS: no replay server,
actor-learners push gradients to the learner).

The role command lines found in the stack's user data and in the Slurm script's dry run are parsed
with the project's own configuration parser, so a flag that a role does not take, a bad value or an
actor index outside the ladder fails here rather than on a cluster.
"""

from __future__ import annotations

import ast
import base64
import datetime
import fnmatch
import functools
import getpass
import importlib.util
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from apex_zmq import config as C

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "ec2" / "apex-zmq.yaml"
SBATCH = ROOT / "deploy" / "slurm" / "apex-zmq.sbatch"
REGION = "us-east-1"
KEY_PREFIX = "/apex-zmq/test-run/keys"
OPERATOR_CIDR = "203.0.113.7/32"
ACTOR_COUNT = 3
SERVER_KEY_FILES = {"server.key", "server.key_secret", "client.key", "client.key_secret", "authorized/client.key"}
ACTOR_KEY_FILES = {"server.key", "client.key", "client.key_secret"}
GPU_AMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-amazon-linux-2023/latest/ami-id"

# Boolean flags (argparse's --insecure / --no-insecure) take no value on a command line.
BOOL_FLAGS = {"--" + name.replace("_", "-")
              for name, tp in typing.get_type_hints(C.LaunchConfig).items() if tp is bool}

# Which endpoint each role is given, and on which host it must be: the learner host binds
# experience, samples, priorities (replay server) and weights (learner); the evaluator binds
# telemetry. Every other use is a connect to that same address.
ENDPOINTS = {
    "replay_server": {"experience": "learner", "samples": "learner", "priorities": "learner",
                      "telemetry": "evaluator"},
    "learner": {"samples": "learner", "priorities": "learner", "weights": "learner",
                "telemetry": "evaluator"},
    "evaluator": {"telemetry": "evaluator", "weights": "learner"},
    "actor": {"experience": "learner", "weights": "learner", "telemetry": "evaluator"},
}
# The asynchronous family: no replay server; the learner binds gradients (and weights), which the
# actor-learners connect to. The evaluator's are as above.
ASYNC_ENDPOINTS = {
    "learner": {"gradients": "learner", "weights": "learner", "telemetry": "evaluator"},
    "evaluator": ENDPOINTS["evaluator"],
    "actor": {"gradients": "learner", "weights": "learner", "telemetry": "evaluator"},
}
# The ports the security group opens as one range in each layout (the gradients port is apart).
APEX_PORTS = {k: v for k, v in C.DEFAULT_PORTS.items() if k != "gradients"}


def _load_host_py():
    """deploy/ec2/host.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("apex_deploy_host", ROOT / "deploy" / "ec2" / "host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


host_py = _load_host_py()


def flags_of(argv: list[str]) -> dict[str, str]:
    """``--flag value`` pairs of a command line (``"true"`` for a boolean flag)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        flag = argv[i]
        assert flag.startswith("--"), f"stray argument {flag!r} in {argv}"
        assert flag not in out, f"{flag} given twice in {argv}"
        if flag in BOOL_FLAGS:
            out[flag] = "true"
            i += 1
            continue
        assert i + 1 < len(argv) and not argv[i + 1].startswith("--"), f"{flag} has no value in {argv}"
        out[flag] = argv[i + 1]
        i += 2
    return out


def check_role_command(argv: list[str], hosts: dict[str, str], keys_dir: str,
                       dashboard_host: str, endpoints: dict = ENDPOINTS) -> tuple[str, dict[str, str]]:
    """Check one ``apex-zmq <role> ...`` command line; returns the role and its flags.

    ``hosts`` maps "learner"/"evaluator" to the address that role's endpoints must point at;
    ``dashboard_host`` is where the evaluator's dashboard must listen; ``endpoints`` is the layout
    (``ENDPOINTS``, or ``ASYNC_ENDPOINTS``, which must then be the role's --algo family).
    """
    assert Path(argv[0]).name == "apex-zmq", argv
    role = argv[1]
    assert role in C.ROLE_CONFIGS, f"unknown role {role!r}"
    assert role in endpoints, f"{role} runs in a layout that has none"
    flags = flags_of(argv[2:])
    assert flags.get("--keys") == keys_dir, f"{role} is not given --keys {keys_dir}: {argv}"
    want = {f"--{name}": C.endpoint(hosts[host], C.DEFAULT_PORTS[name])
            for name, host in endpoints[role].items()}
    got = {f: v for f, v in flags.items() if f.lstrip("-") in C.DEFAULT_PORTS}
    assert got == want, f"{role} endpoints {got} != {want}"
    if role == "evaluator":
        assert flags["--dashboard-host"] == dashboard_host, argv
        # The dashboard's own rule (a non-loopback page needs --insecure), or the evaluator would exit.
        from evaluator.dashboard.server import check_host
        check_host(dashboard_host, "--insecure" in flags)
    # --insecure has one legitimate use here: the evaluator's dashboard page (no authentication of
    # its own) on a non-loopback address. With --keys, ZeroMQ stays CURVE either way.
    if "--insecure" in flags:
        assert role == "evaluator" and not dashboard_host.startswith("127."), f"{role} runs --insecure: {argv}"
    # The project's own parser and validation (every flag known, types, actor index < --num-actors).
    cfg = C.parse(C.ROLE_CONFIGS[role], argv[2:], role)
    assert cfg.keys == keys_dir and cfg.num_actors == int(flags["--num-actors"])
    assert C.is_async(cfg) == (endpoints is ASYNC_ENDPOINTS), f"{role} --algo {cfg.algo} in the wrong layout"
    return role, flags


# --- (a) the template lints clean ----------------------------------------------------------------

def test_template_passes_cfn_lint():
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    assert cfn_lint.exists(), f"{cfn_lint} missing: install requirements-dev.txt"
    proc = subprocess.run([str(cfn_lint), str(TEMPLATE)], capture_output=True, text=True, timeout=120)
    # cfn-lint's status is a bit mask: 2 errors, 4 warnings, 8 informational; 1 is a crash.
    assert proc.returncode & 3 == 0, f"cfn-lint found errors:\n{proc.stdout}{proc.stderr}"
    assert not re.search(r"^E\d{4}", proc.stdout, re.M), proc.stdout


def test_template_ports_match_config():
    from cfnlint.decode import decode_str
    tpl, errors = decode_str(TEMPLATE.read_text())
    assert not errors
    ports = {name.lower(): port for name, port in tpl["Mappings"]["Ports"]["ZeroMQ"].items()}
    assert ports == C.DEFAULT_PORTS and ports["gradients"] == 5557
    # The security group opens one range from experience to telemetry (Ape-X; weights to telemetry
    # for the asynchronous family): it must be exactly those ports, the gradients port outside it,
    # with its own rule.
    assert sorted(APEX_PORTS.values()) == list(range(APEX_PORTS["experience"], APEX_PORTS["telemetry"] + 1))
    assert APEX_PORTS["weights"] + 1 == APEX_PORTS["telemetry"]
    assert not APEX_PORTS["experience"] <= ports["gradients"] <= APEX_PORTS["telemetry"]
    res = tpl["Resources"]
    zmq_rule, grad_rule = res["ClusterZeroMQIngress"]["Properties"], res["ClusterGradientsIngress"]
    assert zmq_rule["FromPort"] == {"Fn::If": ["AsyncAlgo", {"Fn::FindInMap": ["Ports", "ZeroMQ", "Weights"]},
                                               {"Fn::FindInMap": ["Ports", "ZeroMQ", "Experience"]}]}
    assert zmq_rule["ToPort"] == {"Fn::FindInMap": ["Ports", "ZeroMQ", "Telemetry"]}
    assert grad_rule["Condition"] == "AsyncAlgo"
    assert grad_rule["Properties"]["FromPort"] == grad_rule["Properties"]["ToPort"] == \
        {"Fn::FindInMap": ["Ports", "ZeroMQ", "Gradients"]}


def test_template_algo_parameter_matches_config():
    """Algo offers every --algo, defaults to dqn, and AsyncAlgo is exactly config.ASYNC_ALGOS."""
    from cfnlint.decode import decode_str
    tpl, errors = decode_str(TEMPLATE.read_text())
    assert not errors
    algo = tpl["Parameters"]["Algo"]
    assert algo["Default"] == "dqn" and algo["AllowedValues"] == list(C.ALGOS)
    cond = tpl["Conditions"]["AsyncAlgo"]["Fn::Or"]
    assert [c["Fn::Equals"] for c in cond] == [[{"Ref": "Algo"}, a] for a in C.ASYNC_ALGOS]


# --- (b) the stack in moto -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aws():
    """moto's AWS for this module, with credentials that cannot reach a real account."""
    import moto  # requirements-dev.txt
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_SESSION_TOKEN="testing", AWS_DEFAULT_REGION=REGION)
    os.environ.pop("AWS_PROFILE", None)
    with moto.mock_aws():
        yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _client(name: str):
    import boto3
    return boto3.client(name, region_name=REGION)


def _seed_gpu_ami(image_id: str) -> None:
    """Publish the Deep Learning AMI's public SSM parameter in moto, as AWS publishes it.

    moto only ships Amazon Linux's public AMI parameters, refuses to create /aws/ names through the
    API (as AWS does), and resolves every SSM-typed parameter's default even when a value is passed:
    so the parameter is added to moto's store the way moto loads its own public ones.
    """
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ssm.models import Parameter, ssm_backends
    ssm_backends[DEFAULT_ACCOUNT_ID][REGION]._parameters[GPU_AMI_PARAMETER].append(Parameter(
        account_id=DEFAULT_ACCOUNT_ID, name=GPU_AMI_PARAMETER, value=image_id, parameter_type="String",
        description=None, allowed_pattern=None, keyid=None,
        last_modified_date=datetime.datetime.now().timestamp(), version=1, data_type="aws:ec2:image"))


def _create_stack(name: str, **overrides: str) -> dict:
    """Network, keys in Parameter Store and the stack; returns what the checks need."""
    ec2, cf = _client("ec2"), _client("cloudformation")
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.20.{i}.0/24", AvailabilityZone=f"{REGION}{z}")
               ["Subnet"] for i, z in ((1, "a"), (2, "b"))]
    params = dict(VpcId=vpc, ServerSubnetId=subnets[0]["SubnetId"],
                  ActorSubnetIds=",".join(s["SubnetId"] for s in subnets), OperatorCidr=OPERATOR_CIDR,
                  AssignPublicIps="false", ActorCount=str(ACTOR_COUNT), EnvsPerActor="16",
                  SourceUrl="https://github.com/example/apex-zmq.git", SourceRef="v1.2.0",
                  KeysParameterPrefix=KEY_PREFIX, EnvId="ALE/Breakout-v5", DashboardPort="8088")
    params.update(overrides)
    cf.create_stack(StackName=name, TemplateBody=TEMPLATE.read_text(), Capabilities=["CAPABILITY_IAM"],
                    Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()])
    stack = cf.describe_stacks(StackName=name)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    resources = {r["LogicalResourceId"]: r["PhysicalResourceId"]
                 for r in cf.list_stack_resources(StackName=name)["StackResourceSummaries"]}
    return dict(params=params, stack=stack, resources=resources, subnets=subnets,
                outputs={o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]})


def _user_data(instance_id: str) -> str:
    attr = _client("ec2").describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(attr["UserData"]["Value"]).decode()


@pytest.fixture(scope="module")
def stack(aws, tmp_path_factory):
    """The stack created with realistic parameters, the real CURVE keys in Parameter Store first."""
    from apex_zmq import keys as apex_keys
    ec2, ssm = _client("ec2"), _client("ssm")
    al2023 = ssm.get_parameter(Name="/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64")
    cpu_ami = al2023["Parameter"]["Value"]
    gpu_ami = next(i["ImageId"] for i in ec2.describe_images(Owners=["amazon"])["Images"] if i["ImageId"] != cpu_ami)
    _seed_gpu_ami(gpu_ami)
    # Real key files from `apex-zmq keys DIR`, uploaded as deploy/README.md says (one parameter per file).
    key_dir = tmp_path_factory.mktemp("curve") / "keys"
    apex_keys.create(key_dir)
    key_files = {str(p.relative_to(key_dir)): p.read_text() for p in key_dir.rglob("*") if p.is_file()}
    assert set(key_files) == SERVER_KEY_FILES, "apex-zmq keys changed its layout: update the template's fetch-keys names"
    for fname, text in key_files.items():
        ssm.put_parameter(Name=f"{KEY_PREFIX}/{fname}", Value=text, Type="SecureString")
    s = _read_back(_create_stack("apex-test"))
    s.update(key_files=key_files, cpu_ami=cpu_ami, gpu_ami=gpu_ami)
    return s


@pytest.fixture(scope="module")
def async_stack(stack):
    """The same stack with Algo=a3c (the asynchronous family); ``stack`` put the keys in place."""
    return _read_back(_create_stack("apex-async", Algo="a3c"))


def _read_back(s: dict) -> dict:
    """Add to ``_create_stack``'s answer what the checks read back: the server hosts' addresses,
    their interfaces, the actors' launch template and group, and each host's user data."""
    ec2 = _client("ec2")
    r = s["resources"]
    enis = {eni["NetworkInterfaceId"]: eni for eni in ec2.describe_network_interfaces(
        NetworkInterfaceIds=[r["LearnerInterface"], r["EvaluatorInterface"]])["NetworkInterfaces"]}
    lt = ec2.describe_launch_template_versions(LaunchTemplateId=r["ActorLaunchTemplate"])["LaunchTemplateVersions"]
    group = _client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[r["ActorGroup"]])
    from cfnlint.decode import decode_str
    s.update(
        template=decode_str(TEMPLATE.read_text())[0],
        hosts={"learner": enis[r["LearnerInterface"]]["PrivateIpAddress"],
               "evaluator": enis[r["EvaluatorInterface"]]["PrivateIpAddress"]},
        enis=enis, launch_data=lt[-1]["LaunchTemplateData"],
        group=group["AutoScalingGroups"][0],
        user_data={"learner": _user_data(r["LearnerHost"]), "evaluator": _user_data(r["EvaluatorHost"]),
                   "actor": base64.b64decode(lt[-1]["LaunchTemplateData"]["UserData"]).decode()})
    return s


def _exec_starts(user_data: str) -> dict[str, tuple[str, list[str]]]:
    """Each systemd drop-in the user data writes: role -> (drop-in text, ExecStart argv)."""
    out = {}
    for m in re.finditer(r"cat > /etc/systemd/system/apex-zmq@(\w+)\.service\.d/exec\.conf <<'UNIT'\n(.*?)\nUNIT\n",
                         user_data, re.S):
        role, body = m.group(1), m.group(2)
        execs = re.findall(r"^ExecStart=(.*)$", body, re.M)
        assert len(execs) == 1, body
        out[role] = (body, shlex.split(execs[0]))
    return out


def _enabled(user_data: str) -> list[str]:
    m = re.search(r"^systemctl enable --now (.+)$", user_data, re.M)
    assert m, user_data
    return m.group(1).split()


def _host_py_argv(user_data: str, command: str) -> list[str]:
    """The arguments of the user data's one ``host.py <command>`` call (command included)."""
    calls = [shlex.split(ln) for ln in user_data.splitlines() if f'host.py" {command} ' in ln]
    assert len(calls) == 1, calls
    argv = calls[0]
    assert argv[0] == "$SRC/.venv/bin/python" and argv[1] == "$SRC/deploy/ec2/host.py", argv
    return argv[2:]


def _fetch_keys_args(user_data: str) -> dict[str, str]:
    return flags_of(_host_py_argv(user_data, "fetch-keys")[1:])


def test_stack_addresses_come_from_the_server_interfaces(stack):
    r, t, hosts = stack["resources"], stack["template"]["Resources"], stack["hosts"]
    server_subnet = stack["subnets"][0]
    for host, eni in (("learner", "LearnerInterface"), ("evaluator", "EvaluatorInterface")):
        assert stack["enis"][r[eni]]["SubnetId"] == server_subnet["SubnetId"]
        assert hosts[host].startswith("10.20.1."), hosts
    assert hosts["learner"] != hosts["evaluator"]
    # moto creates instances without attaching a pre-made interface, so that link is read from
    # the template: each server host's primary interface (device 0) is the interface whose address
    # every user data uses.
    assert t["LearnerHost"]["Properties"]["NetworkInterfaces"] == [
        {"NetworkInterfaceId": {"Ref": "LearnerInterface"}, "DeviceIndex": "0"}]
    assert t["EvaluatorHost"]["Properties"]["NetworkInterfaces"] == [
        {"NetworkInterfaceId": {"Ref": "EvaluatorInterface"}, "DeviceIndex": "0"}]
    assert stack["outputs"]["LearnerPrivateIp"] == hosts["learner"]
    assert stack["outputs"]["EvaluatorPrivateIp"] == hosts["evaluator"]
    assert stack["outputs"]["DashboardUrl"] == f"http://{hosts['evaluator']}:8088/"


def _check_host_roles(stack: dict, expected_roles: dict[str, list[str]], endpoints: dict, algo: str,
                      tmp_path: Path) -> dict[str, dict[str, str]]:
    """Each host's user data is valid bash, runs exactly ``expected_roles`` (a drop-in each, all
    enabled), each with its keys, --algo ``algo`` and the endpoints of ``endpoints`` on the server
    interfaces' addresses; returns each role's flags."""
    hosts, ud = stack["hosts"], stack["user_data"]
    for host, text in ud.items():
        assert text.startswith("#!/bin/bash\n"), host
        proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        assert proc.returncode == 0, f"{host} user data: {proc.stderr}"
    seen = {}
    for host, roles in expected_roles.items():
        units = _exec_starts(ud[host])
        assert sorted(units) == sorted(roles), f"{host} host runs {sorted(units)}"
        assert _enabled(ud[host]) == [f"apex-zmq@{role}" for role in roles]
        keys_dir = _fetch_keys_args(ud[host])["--dir"]
        for role in roles:
            body, argv = units[role]
            if role == "actor":
                # systemd expands ${APEX_ACTOR_INDEX} from the EnvironmentFile that host.py writes.
                env_file = re.search(r"^EnvironmentFile=(.*)$", body, re.M).group(1)
                assert flags_of(_host_py_argv(ud[host], "claim-actor-index")[1:])["--env-file"] == env_file
                assert argv[argv.index("--actor-index") + 1] == "${APEX_ACTOR_INDEX}"
                written = tmp_path / "actor.env"
                host_py.write_env_file(str(written), ACTOR_COUNT - 1)
                env = dict(line.split("=", 1) for line in written.read_text().split())
                argv = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], a) for a in argv]
            got_role, flags = check_role_command(argv, hosts, keys_dir, dashboard_host=hosts["evaluator"],
                                                 endpoints=endpoints)
            assert got_role == role
            assert flags["--env"] == "ALE/Breakout-v5" and flags["--num-actors"] == str(ACTOR_COUNT)
            assert flags["--envs-per-actor"] == "16" and flags["--algo"] == algo
            seen[role] = flags
    assert set(seen) == set(endpoints)  # every role of the layout runs somewhere
    return seen


def test_stack_hosts_run_their_roles_with_keys_and_right_endpoints(stack, tmp_path):
    ud = stack["user_data"]
    expected_roles = {"learner": ["replay_server", "learner"], "evaluator": ["evaluator"], "actor": ["actor"]}
    _check_host_roles(stack, expected_roles, ENDPOINTS, "dqn", tmp_path)  # Algo's default
    assert "gradients" not in "".join(ud.values())
    learner = _exec_starts(ud["learner"])["learner"][1]
    assert learner[learner.index("--device") + 1] == "cuda"
    evaluator = _exec_starts(ud["evaluator"])["evaluator"][1]
    assert evaluator[evaluator.index("--dashboard-port") + 1] == "8088"
    # The source is the requested ref, and the GPU AMI goes to the learner host only.
    for text in ud.values():
        assert 'git clone --no-checkout "https://github.com/example/apex-zmq.git"' in text
        assert 'checkout --detach "origin/v1.2.0"' in text
    ec2 = _client("ec2")
    learner_host = ec2.describe_instances(InstanceIds=[stack["resources"]["LearnerHost"]])
    assert learner_host["Reservations"][0]["Instances"][0]["ImageId"] == stack["gpu_ami"]
    assert stack["launch_data"]["ImageId"] == stack["cpu_ami"]


def test_async_stack_runs_no_replay_server_and_sends_gradients(async_stack, tmp_path):
    """Algo=a3c: the learner host runs the learner alone, binding the gradients endpoint on its
    address; every actor is an actor-learner pushing gradients there; every role gets --algo a3c."""
    ud, hosts = async_stack["user_data"], async_stack["hosts"]
    expected_roles = {"learner": ["learner"], "evaluator": ["evaluator"], "actor": ["actor"]}
    flags = _check_host_roles(async_stack, expected_roles, ASYNC_ENDPOINTS, "a3c", tmp_path)
    gradients = C.endpoint(hosts["learner"], C.DEFAULT_PORTS["gradients"])
    assert flags["learner"]["--gradients"] == flags["actor"]["--gradients"] == gradients
    assert flags["learner"]["--device"] == "cuda"
    for host, text in ud.items():
        assert "replay_server" not in text and "--experience" not in text and "--samples" not in text, host
    # Nothing of the variables the template fills in is left over, and the actor's index is still
    # systemd's to expand.
    for text in ud.values():
        assert not re.search(r"\$\{(?!APEX_ACTOR_INDEX\})", text.replace("${SRC}", "")), text
    # The GPU AMI still goes to the learner host, and the outputs name it.
    ec2 = _client("ec2")
    learner_host = ec2.describe_instances(InstanceIds=[async_stack["resources"]["LearnerHost"]])
    assert learner_host["Reservations"][0]["Instances"][0]["ImageId"] != async_stack["launch_data"]["ImageId"]
    assert async_stack["outputs"]["LearnerPrivateIp"] == hosts["learner"]


def _verify_units(user_data: dict[str, str], tmp_path: Path) -> None:
    """The unit template (bootstrap.sh) with each role's drop-in passes ``systemd-analyze verify``."""
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed")
    m = re.search(r"^cat > /etc/systemd/system/apex-zmq@\.service <<UNIT\n(.*?)\nUNIT\n",
                  (ROOT / "deploy" / "ec2" / "bootstrap.sh").read_text(), re.S | re.M)
    assert m, "bootstrap.sh writes no apex-zmq@.service"
    # An unquoted here-document: bash expands $SRC, as it does on the host.
    template = m.group(1).replace("$SRC", "/opt/apex-zmq/src")
    assert "$" not in template
    (tmp_path / "apex-zmq@.service").write_text(template)
    # verify insists that ExecStart's program exists: a stand-in replaces the venv's apex-zmq.
    program = tmp_path / "apex-zmq"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    for host in ("learner", "evaluator", "actor"):
        for role, (body, argv) in _exec_starts(user_data[host]).items():
            assert argv[0] == "/opt/apex-zmq/src/.venv/bin/apex-zmq"
            dropin = tmp_path / f"apex-zmq@{role}.service.d"
            dropin.mkdir()
            (dropin / "exec.conf").write_text(body.replace(argv[0], str(program)) + "\n")
            proc = subprocess.run([analyze, "verify", str(tmp_path / f"apex-zmq@{role}.service")],
                                  capture_output=True, text=True, timeout=60)
            # A misspelt setting is only a warning ("Unknown key ..., ignoring"): fail on those too.
            ours = [ln for ln in (proc.stdout + proc.stderr).splitlines() if str(tmp_path) in ln or "apex-zmq@" in ln]
            assert proc.returncode == 0 and not ours, f"{role}: {proc.stdout}{proc.stderr}"


def test_stack_systemd_units_verify(stack, tmp_path):
    _verify_units(stack["user_data"], tmp_path)


def test_async_stack_systemd_units_verify(async_stack, tmp_path):
    _verify_units(async_stack["user_data"], tmp_path)


def _zeromq_rules(stack: dict) -> tuple[dict, dict, list[tuple]]:
    """The VPC's security groups by id, and the cluster group's rules as (protocol, from, to,
    source groups, address ranges, IPv6 ranges), sorted."""
    r = stack["resources"]
    groups = {g["GroupId"]: g for g in _client("ec2").describe_security_groups(
        Filters=[{"Name": "vpc-id", "Values": [stack["params"]["VpcId"]]}])["SecurityGroups"]}
    rules = sorted((p["IpProtocol"], p["FromPort"], p["ToPort"], [g["GroupId"] for g in p["UserIdGroupPairs"]],
                    p["IpRanges"], p["Ipv6Ranges"]) for p in groups[r["ClusterSecurityGroup"]]["IpPermissions"])
    return r, groups, rules


def _no_other_zeromq_access(stack: dict, groups: dict) -> None:
    """No group of the VPC but the cluster group, and no address range, reaches a ZeroMQ port."""
    lo, hi = min(C.DEFAULT_PORTS.values()), max(C.DEFAULT_PORTS.values())
    for g in groups.values():
        for p in g["IpPermissions"]:
            if p.get("FromPort") is not None and p["FromPort"] <= hi and p["ToPort"] >= lo:
                assert g["GroupId"] == stack["resources"]["ClusterSecurityGroup"] and not p["IpRanges"], g


def test_stack_security_groups(stack):
    r, groups, rules = _zeromq_rules(stack)
    dashboard = groups[r["DashboardSecurityGroup"]]
    lo, hi = APEX_PORTS["experience"], APEX_PORTS["telemetry"]
    # ZeroMQ: one rule, experience..telemetry from members of the group itself, no address range at
    # all; no gradients port (Ape-X has no gradients).
    assert rules == [("tcp", lo, hi, [r["ClusterSecurityGroup"]], [], [])]
    # Dashboard: its port, from the operator's range only.
    assert [(p["IpProtocol"], p["FromPort"], p["ToPort"], [x["CidrIp"] for x in p["IpRanges"]],
             p["UserIdGroupPairs"]) for p in dashboard["IpPermissions"]] == [("tcp", 8088, 8088, [OPERATOR_CIDR], [])]
    _no_other_zeromq_access(stack, groups)
    # Membership: actors (launch template) and the learner are in the cluster group only; the
    # evaluator is also in the dashboard group. moto ignores GroupSet on interfaces, so the
    # interfaces' groups are read from the template.
    assert [ni["Groups"] for ni in stack["launch_data"]["NetworkInterfaces"]] == [[r["ClusterSecurityGroup"]]]
    assert stack["launch_data"]["NetworkInterfaces"][0]["AssociatePublicIpAddress"] is False
    t = stack["template"]["Resources"]
    assert t["LearnerInterface"]["Properties"]["GroupSet"] == [{"Ref": "ClusterSecurityGroup"}]
    assert t["EvaluatorInterface"]["Properties"]["GroupSet"] == [{"Ref": "ClusterSecurityGroup"},
                                                                 {"Ref": "DashboardSecurityGroup"}]


def test_async_stack_security_groups_open_the_gradients_port(async_stack):
    """Algo=a3c: the cluster group admits its members (the actors, the learner host) to the gradients
    port, and of the Ape-X range keeps only weights and telemetry (no replay server listens)."""
    r, groups, rules = _zeromq_rules(async_stack)
    sg = [r["ClusterSecurityGroup"]]
    ports = C.DEFAULT_PORTS
    assert rules == [("tcp", ports["weights"], ports["telemetry"], sg, [], []),
                     ("tcp", ports["gradients"], ports["gradients"], sg, [], [])]
    _no_other_zeromq_access(async_stack, groups)
    # The gradients' sender and receiver are both members: the actors (launch template), and the
    # learner host (its interface, read from the template as moto ignores GroupSet).
    assert [ni["Groups"] for ni in async_stack["launch_data"]["NetworkInterfaces"]] == [sg]
    t = async_stack["template"]["Resources"]
    assert t["LearnerInterface"]["Properties"]["GroupSet"] == [{"Ref": "ClusterSecurityGroup"}]


def _policy_statements(role_name: str) -> list[dict]:
    iam = _client("iam")
    out = []
    for name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
        doc = iam.get_role_policy(RoleName=role_name, PolicyName=name)["PolicyDocument"]
        # moto returns the document as a Python repr and keeps AWS::NoValue list entries as None.
        doc = ast.literal_eval(doc) if isinstance(doc, str) else doc
        out += [s for s in doc["Statement"] if s is not None]
    return out


def _allowed(statements: list[dict], action: str, resource: str) -> bool:
    def listed(v):
        return v if isinstance(v, list) else [v]
    return any(s["Effect"] == "Allow" and action in listed(s["Action"])
               and any(fnmatch.fnmatchcase(resource, pattern) for pattern in listed(s["Resource"]))
               for s in statements)


def test_stack_keys_come_only_from_parameter_store(stack, tmp_path):
    r, ud = stack["resources"], stack["user_data"]
    account = stack["stack"]["StackId"].split(":")[4]
    arn = f"arn:aws:ssm:{REGION}:{account}:parameter{KEY_PREFIX}/"
    server, actor = _policy_statements(r["ServerRole"]), _policy_statements(r["ActorRole"])
    # Each host's role lets it read exactly the key files its user data fetches, nothing outside
    # the prefix, and the actors never get the server's secret key.
    for statements, host in ((server, "learner"), (server, "evaluator"), (actor, "actor")):
        args = _fetch_keys_args(ud[host])
        assert args["--prefix"] == KEY_PREFIX and args["--owner"] == "apex"
        for name in args["--names"].split(","):
            assert _allowed(statements, "ssm:GetParameters", arn + name), (host, name)
        assert not _allowed(statements, "ssm:GetParameters", f"arn:aws:ssm:{REGION}:{account}:parameter/other/x")
    for host, names in (("learner", SERVER_KEY_FILES), ("evaluator", SERVER_KEY_FILES), ("actor", ACTOR_KEY_FILES)):
        assert set(_fetch_keys_args(ud[host])["--names"].split(",")) == names, host
    assert not _allowed(actor, "ssm:GetParameters", arn + "server.key_secret")
    # No key material anywhere in the template, the user data or the launch template.
    secrets = [re.search(r'secret-key = "(.+)"', text).group(1)
               for name, text in stack["key_files"].items() if name.endswith("_secret")]
    publics = [re.search(r'public-key = "(.+)"', text).group(1) for text in stack["key_files"].values()]
    launch_data = repr(stack["launch_data"])
    for text in (TEMPLATE.read_text(), *ud.values(), launch_data, repr(stack["outputs"])):
        assert "secret-key" not in text and "public-key" not in text
        for key in secrets + publics:
            assert key not in text
    # host.py run with each user data's own arguments (but this test's directory and user): the
    # files arrive intact, directories 0700 and files 0600, and the roles' key loader accepts them.
    from apex_zmq.keys import KeysError, KeyStore
    fetched = {}
    for host in ("learner", "evaluator", "actor"):
        dest = tmp_path / host / "keys"
        argv = _host_py_argv(ud[host], "fetch-keys")
        argv[argv.index("--dir") + 1] = str(dest)
        argv[argv.index("--owner") + 1] = getpass.getuser()
        assert host_py.main(argv) == 0
        files = {str(p.relative_to(dest)): p for p in dest.rglob("*") if p.is_file()}
        assert set(files) == set(_fetch_keys_args(ud[host])["--names"].split(","))
        for d in [dest, *(p for p in dest.rglob("*") if p.is_dir())]:
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        for name, p in files.items():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
            assert p.read_text() == stack["key_files"][name]
        fetched[host] = KeyStore(dest)
    # What the roles load from them (apex_zmq.transport): every role connects (client pair, server
    # public key); the replay server, learner and evaluator also bind (server pair, and the client
    # keys they admit).
    actor_client = fetched["actor"].client_pair()[0]
    for host, store in fetched.items():
        assert store.client_pair() and store.server_public() == fetched["learner"].server_pair()[0]
        if host == "actor":
            with pytest.raises(KeysError):
                store.server_pair()  # an actor host cannot pose as a server
        else:
            assert store.server_pair() and store.authorized() == {actor_client}


def test_fetch_keys_refuses_missing_and_unencrypted_secrets(aws, tmp_path):
    ssm = _client("ssm")
    prefix = "/apex-zmq/plain"
    ssm.put_parameter(Name=f"{prefix}/client.key", Value="public", Type="String")
    ssm.put_parameter(Name=f"{prefix}/client.key_secret", Value="secret", Type="String")
    with pytest.raises(SystemExit, match="server.key"):
        host_py.fetch_keys(ssm, prefix, ["client.key", "server.key"], str(tmp_path / "a"))
    with pytest.raises(SystemExit, match="SecureString"):
        host_py.fetch_keys(ssm, prefix, ["client.key", "client.key_secret"], str(tmp_path / "b"))
    assert not (tmp_path / "b" / "client.key_secret").exists()
    for bad in ("../client.key", "/etc/passwd", "authorized//client.key"):
        with pytest.raises(SystemExit, match="relative path"):
            host_py.fetch_keys(ssm, prefix, [bad], str(tmp_path / "c"))


def test_actor_index_claims_are_unique_and_taken_over(stack, tmp_path):
    ddb, ec2 = _client("dynamodb"), _client("ec2")
    table = stack["resources"]["ActorSlots"]
    actors = [i["InstanceId"] for i in stack["group"]["Instances"]]
    assert len(actors) == ACTOR_COUNT

    def claim(me, timeout_s=0.0):
        return host_py.claim_actor_index(ddb, ec2, table, ACTOR_COUNT, me, timeout_s=timeout_s,
                                         sleep=lambda s: None)
    got = [claim(me) for me in actors]
    assert sorted(got) == list(range(ACTOR_COUNT))
    assert claim(actors[1]) == got[1]  # a reboot keeps the index
    # The conditional write is what makes simultaneous claims safe: only one wins a free index.
    assert host_py._put(ddb, table, 99, "i-a", "attribute_not_exists(#k)", {})
    assert not host_py._put(ddb, table, 99, "i-b", "attribute_not_exists(#k)", {})
    # A new instance while every index is held by a running actor: no index, after the timeout.
    newcomer = ec2.run_instances(ImageId=stack["cpu_ami"], MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    with pytest.raises(SystemExit, match="held by running instances"):
        claim(newcomer)
    # The group replaces actor 1: its successor takes over the freed index (the ladder's rungs),
    # here through host.py's command line exactly as the actor user data calls it.
    ec2.terminate_instances(InstanceIds=[actors[1]])
    argv = _host_py_argv(stack["user_data"]["actor"], "claim-actor-index")
    assert flags_of(argv[1:])["--table"] == table and flags_of(argv[1:])["--count"] == str(ACTOR_COUNT)
    env_file = tmp_path / "actor.env"
    argv[argv.index("--env-file") + 1] = str(env_file)
    assert host_py.main(argv + ["--instance-id", newcomer, "--timeout", "0"]) == 0
    assert env_file.read_text() == f"APEX_ACTOR_INDEX={got[1]}\n"
    assert claim(actors[0]) == got[0] and claim(actors[2]) == got[2]


@pytest.mark.filterwarnings("ignore:Tried to parse")  # moto has no EIPAssociation; nothing here reads it
def test_stack_with_public_addresses_and_ssh(stack):
    _client("ec2").create_key_pair(KeyName="operator")
    s = _create_stack("apex-public", AssignPublicIps="true", KeyName="operator")
    r = s["resources"]
    eip = s["outputs"]["DashboardUrl"].split("//")[1].split(":")[0]
    assert eip == r["EvaluatorPublicIp"]  # an EIP's physical id is its address
    lt = _client("ec2").describe_launch_template_versions(LaunchTemplateId=r["ActorLaunchTemplate"])
    data = lt["LaunchTemplateVersions"][-1]["LaunchTemplateData"]
    assert data["NetworkInterfaces"][0]["AssociatePublicIpAddress"] is True and data["KeyName"] == "operator"
    cluster = _client("ec2").describe_security_groups(GroupIds=[r["ClusterSecurityGroup"]])["SecurityGroups"][0]
    ssh = [p for p in cluster["IpPermissions"] if p["FromPort"] == 22]
    assert [[x["CidrIp"] for x in p["IpRanges"]] for p in ssh] == [[OPERATOR_CIDR]]


# --- (c) the Slurm batch script ----------------------------------------------------------------------

def _fake_scontrol(tmp_path: Path, nodes: list[str]) -> dict[str, str]:
    """PATH with an ``scontrol`` that expands the node list the way Slurm's would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "scontrol"
    tool.write_text("#!/bin/bash\n[ \"$1 $2\" = 'show hostnames' ] || exit 2\nprintf '%s\\n' "
                    + " ".join(shlex.quote(n) for n in nodes) + "\n")
    tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _dry_run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "APEX_"))}
    return subprocess.run(["bash", str(SBATCH), *args], env={**keep, "APEX_DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=30)


def _parse_dry_run(stdout: str) -> list[tuple[str, list[str]]]:
    out = []
    for line in stdout.splitlines():
        if line.startswith("#"):
            continue
        where, _, cmd = line.partition(": ")
        out.append((where, shlex.split(cmd)))
    return out


def test_sbatch_syntax():
    for script in (SBATCH, ROOT / "deploy" / "slurm" / "single-node-cluster.sh", ROOT / "deploy" / "ec2" / "bootstrap.sh"):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def _check_dry_run_three_nodes(tmp_path: Path, args: list[str], server_roles: list[str],
                               endpoints: dict) -> list[tuple[str, list[str]]]:
    """The dry run of a 3-node allocation with flags ``args``: ``server_roles`` on the first node,
    8 actors on the others, every command line checked in the ``endpoints`` layout."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    env = {**_fake_scontrol(tmp_path, ["cn017", "cn018", "cn019"]), "SLURM_JOB_NODELIST": "cn[017-019]",
           "SLURM_JOB_ID": "4242", "SLURM_CPUS_ON_NODE": "4", "SLURM_SUBMIT_DIR": "/shared/apex",
           "APEX_HEAD_ADDR": "10.3.0.17", "APEX_KEYS": str(keys), "APEX_ENVS_PER_ACTOR": "8"}
    proc = _dry_run(env, *args, "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    lines = _parse_dry_run(proc.stdout)
    hosts = {"learner": "10.3.0.17", "evaluator": "10.3.0.17"}
    servers = [(w, a) for w, a in lines if w not in ("srun",) and a[1] != "actor"]
    assert [(w, a[1]) for w, a in servers] == [("cn017", role) for role in server_roles]
    for _, argv in servers:
        role, flags = check_role_command(argv, hosts, str(keys), dashboard_host="127.0.0.1", endpoints=endpoints)
        assert flags["--num-actors"] == "8" and flags["--seed"] == "7"
        assert flags["--run-dir"] == "/shared/apex/runs/slurm-4242"
        assert argv[0] == "/shared/apex/.venv/bin/apex-zmq"
    # One srun step over the two other nodes, 4 tasks each (one per CPU), and the command each
    # task runs: actor i on node 1 + i // 4, with --actor-index i.
    (srun,) = [a for w, a in lines if w == "srun"]
    opts = {a.split("=")[0]: a.split("=", 1)[1] for a in srun[1:srun.index("bash")]}
    assert opts["--nodes"] == "2" and opts["--relative"] == "1"
    assert opts["--ntasks"] == "8" and opts["--ntasks-per-node"] == "4"
    assert "--overlap" not in opts
    task_argv = srun[srun.index("apex-zmq-actor") + 1:]
    actors = [(w, a) for w, a in lines if w != "srun" and a[1] == "actor"]
    assert [w for w, _ in actors] == ["cn018"] * 4 + ["cn019"] * 4
    for i, (_, argv) in enumerate(actors):
        assert argv == task_argv + ["--actor-index", str(i)]
        role, flags = check_role_command(argv, hosts, str(keys), dashboard_host="127.0.0.1", endpoints=endpoints)
        assert flags["--actor-index"] == str(i)
    # What bash -c runs in task i is exactly the printed per-task command.
    script = srun[srun.index("-c") + 1]
    traced = subprocess.run(["bash", "-c", script.replace("exec ", "printf '%s\\n' ", 1), "x", *task_argv],
                            env={"SLURM_PROCID": "5", "PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert traced.stdout.splitlines() == actors[5][1]
    return lines


def test_sbatch_dry_run_three_nodes(tmp_path):
    _check_dry_run_three_nodes(tmp_path, [], ["replay_server", "learner", "evaluator"], ENDPOINTS)


def test_sbatch_dry_run_three_nodes_async(tmp_path):
    """--algo a3c: the first node runs the learner (binding gradients on its address) and the
    evaluator, no replay server; every actor pushes gradients there."""
    lines = _check_dry_run_three_nodes(tmp_path, ["--algo", "a3c"], ["learner", "evaluator"], ASYNC_ENDPOINTS)
    assert not any("replay_server" in argv for _, argv in lines)
    gradients = C.endpoint("10.3.0.17", C.DEFAULT_PORTS["gradients"])
    commands = [argv for w, argv in lines if w != "srun"]
    assert [a[1] for a in commands if "--gradients" in a] == ["learner"] + ["actor"] * 8
    for argv in commands:
        flags = flags_of(argv[2:])
        assert flags["--algo"] == "a3c" and flags.get("--gradients", gradients) == gradients


@pytest.mark.parametrize("algo", C.ALGOS)
def test_sbatch_layout_follows_every_algo(tmp_path, algo):
    """The script's own list of the asynchronous family is config.ASYNC_ALGOS: for each --algo, a
    replay server exactly for Ape-X, and on one node one core less for the servers without it."""
    env = {**_fake_scontrol(tmp_path, ["node1"]), "SLURM_JOB_NODELIST": "node1", "SLURM_CPUS_ON_NODE": "8",
           "APEX_HEAD_ADDR": "10.0.0.5", "APEX_PORT_BASE": "6100"}
    proc = _dry_run(env, f"--algo={algo}")
    assert proc.returncode == 0, proc.stderr
    lines = _parse_dry_run(proc.stdout)
    is_async = algo in C.ASYNC_ALGOS
    servers = [a[1] for w, a in lines if w != "srun" and a[1] != "actor"]
    actors = [a for w, a in lines if w != "srun" and a[1] == "actor"]
    assert servers == (["learner", "evaluator"] if is_async else ["replay_server", "learner", "evaluator"])
    assert len(actors) == (6 if is_async else 5)
    # APEX_PORT_BASE moves every port by the same offset as config.loopback_endpoints does.
    want = C.loopback_endpoints(6100)
    for argv in actors:
        assert f"--algo={algo}" in argv  # passed on as given (the form --algo=X)
        flags = flags_of([part for a in argv[2:] for part in (a.split("=", 1) if a.startswith("--algo=") else [a])])
        sent = "gradients" if is_async else "experience"
        assert flags[f"--{sent}"] == want[sent].replace(C.LOOPBACK, "10.0.0.5")
        assert ("--experience" in flags) != is_async and ("--gradients" in flags) == is_async


def test_sbatch_reads_algo_from_the_config_file(tmp_path):
    """Without --algo among the flags, the layout follows the --config file's algo (read with the
    venv's Python next to APEX_BIN), as each role will read it; a flag still wins."""
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    env = {**_fake_scontrol(tmp_path, ["cn1", "cn2"]), "SLURM_JOB_NODELIST": "cn[1-2]", "SLURM_CPUS_ON_NODE": "2",
           "APEX_HEAD_ADDR": "10.3.0.1", "APEX_BIN": str(venv_bin / "apex-zmq"), "APEX_KEYS": str(keys),
           "APEX_ENV": "CartPole-v1"}
    hosts = {"learner": "10.3.0.1", "evaluator": "10.3.0.1"}
    cases = {"top.toml": ('algo = "nstep_q"\n[learner]\nlr = 0.001\n', ASYNC_ENDPOINTS),
             "tables.toml": ("".join(f'[{r}]\nalgo = "onestep_sarsa"\n' for r in C.ROLE_CONFIGS), ASYNC_ENDPOINTS),
             "run.json": ('{"algo": "a3c"}', ASYNC_ENDPOINTS),
             "rainbow.toml": ('algo = "rainbow"\n', ENDPOINTS)}
    for name, (text, endpoints) in cases.items():
        config = tmp_path / name
        config.write_text(text)
        proc = _dry_run(env, "--config", str(config))
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
        lines = _parse_dry_run(proc.stdout)
        roles = sorted({a[1] for w, a in lines if w != "srun"})
        assert roles == sorted(endpoints), name
        # The project's parser, reading the same file, agrees on the family (check_role_command).
        for where, argv in lines:
            if where != "srun":
                check_role_command(argv, hosts, str(keys), dashboard_host="127.0.0.1", endpoints=endpoints)
    # A flag after the file wins, as it does for the roles.
    proc = _dry_run(env, "--config", str(tmp_path / "run.json"), "--algo", "dqn")
    assert proc.returncode == 0 and "replay_server" in proc.stdout, proc.stderr
    # Tables that disagree, or a file that cannot be read, stop the script before anything runs.
    (tmp_path / "split.toml").write_text('[learner]\nalgo = "a3c"\n[actor]\nalgo = "dqn"\n')
    (tmp_path / "bad.toml").write_text('algo = \n')
    for name, message in (("split.toml", "differ in algo"), ("bad.toml", "cannot read"), ("none.toml", "no such file")):
        proc = _dry_run(env, "--config", str(tmp_path / name))
        assert proc.returncode != 0 and message in proc.stderr and not proc.stdout, (name, proc.stderr)


def test_sbatch_dry_run_refuses_loopback_head_for_other_nodes(tmp_path):
    env = {**_fake_scontrol(tmp_path, ["localhost", "cn002"]), "SLURM_JOB_NODELIST": "localhost,cn002",
           "SLURM_CPUS_ON_NODE": "2"}
    proc = _dry_run(env)
    assert proc.returncode != 0 and "APEX_HEAD_ADDR" in proc.stderr


# --- (d) a real sbatch on a one-node Slurm cluster ---------------------------------------------------

@functools.lru_cache(maxsize=1)  # asked once per session: sinfo takes ~10 s to give up on a dead controller
def _slurm_up() -> str | None:
    """Why a real Slurm submission cannot run here, or None when it can."""
    if not shutil.which("sbatch"):
        return "Slurm is not installed (Debian: run deploy/slurm/single-node-cluster.sh as root)"
    try:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no Slurm controller answering"
    if state.returncode != 0 or not re.search(r"^(idle|mixed)", state.stdout, re.M):
        return f"no idle Slurm node (sinfo: {state.stdout.strip() or state.stderr.strip()})"
    return None


@pytest.mark.parametrize("algo", ["dqn", "a3c"])
def test_sbatch_real_single_node(tmp_path, algo):
    why = _slurm_up()
    if why:
        pytest.skip(why)
    flags = ["--seed", "3"] + ([] if algo == "dqn" else ["--algo", algo])  # dqn: the default, no flag
    # A stand-in for apex-zmq that records its command line (and where it ran) and lets the run
    # end: actors exit, servers wait to be stopped. The Slurm side is real: sbatch, the batch
    # step, srun's tasks and their SLURM_PROCID.
    rec = tmp_path / "rec"
    rec.mkdir()
    stub = tmp_path / "apex-zmq"
    stub.write_text('#!/bin/bash\nf="$STUB_OUT/$1-$$"\n'
                    'printf "%s\\0" "$(hostname -s)" "${SLURM_PROCID:-}" "$@" > "$f.tmp" && mv "$f.tmp" "$f"\n'
                    '[ "$1" = actor ] && exit 0\nexec sleep 60\n')
    stub.chmod(0o755)
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "APEX_"))},
           "STUB_OUT": str(rec), "APEX_BIN": str(stub), "APEX_KEYS": str(keys),
           "APEX_RUN_DIR": str(tmp_path / "run"), "APEX_ACTORS_PER_NODE": "2", "APEX_ENV": "CartPole-v1"}
    name = f"apex-zmq-test-{os.getpid()}"
    try:
        proc = subprocess.run(["sbatch", "--wait", "--nodes=1", "--time=2", f"--job-name={name}",
                               f"--output={tmp_path}/job.out", str(SBATCH), *flags],
                              env=env, capture_output=True, text=True, timeout=90, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--name={name}"], timeout=30)  # leave no job behind
        raise
    job = re.search(r"Submitted batch job (\d+)", proc.stdout)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}{(tmp_path / 'job.out').read_text() if (tmp_path / 'job.out').exists() else ''}"
    recorded = []
    for f in rec.iterdir():
        node, procid, *argv = f.read_bytes().decode().rstrip("\0").split("\0")
        recorded.append((node, procid, [str(stub)] + argv))
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    servers = ["evaluator", "learner"] + ([] if algo in C.ASYNC_ALGOS else ["replay_server"])
    assert sorted(a[1] for _, _, a in recorded) == ["actor", "actor"] + servers
    actors = sorted((p, a) for _, p, a in recorded if a[1] == "actor")
    assert [p for p, _ in actors] == ["0", "1"]
    for procid, argv in actors:
        assert argv[argv.index("--actor-index") + 1] == procid
    # The dry run, given this job's Slurm variables, prints exactly what ran.
    dry = _dry_run({**{k: v for k, v in env.items() if k.startswith("APEX_")}, "SLURM_JOB_NODELIST": node,
                    "SLURM_JOB_ID": job.group(1)}, *flags)
    assert dry.returncode == 0, dry.stderr
    printed = sorted(a for w, a in _parse_dry_run(dry.stdout) if w != "srun")
    assert printed == sorted(a for _, _, a in recorded)
    assert all(n == node for n, _, _ in recorded)
