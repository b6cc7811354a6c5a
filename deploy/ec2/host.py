#!/usr/bin/env python3
"""Host-side steps of the EC2 stack (deploy/ec2/apex-zmq.yaml), run as root by each instance's user data.

    host.py fetch-keys --prefix /apex-zmq/keys --names server.key,authorized/client.key,... --dir DIR
        CURVE key files (the layout of `apex-zmq keys DIR`, apex_zmq/keys.py) from SSM Parameter
        Store into DIR (directories 0700, files 0600), so that no key is ever part of the template,
        the user data or the AMI. PREFIX/NAME becomes DIR/NAME.
    host.py claim-actor-index --table TABLE --count N --env-file FILE
        A unique actor index 0..N-1 for this instance, claimed in the stack's DynamoDB table, written
        as ``APEX_ACTOR_INDEX=i`` for the actor's systemd unit.

Why a claim table: instances of an Auto Scaling group are identical and have no index of their own,
but the epsilon ladder needs each actor's index to be unique and dense (actor i explores with rungs
i*K .. i*K+K-1 of the N*K rungs). A conditional write is atomic, so two instances booting together
can never take the same index; a replacement instance takes over the index of an instance that is
no longer running, so the ladder gets its missing rungs back.

Needs boto3 (bootstrap.sh installs it into the project's venv); the rest is the standard library.
"""

from __future__ import annotations

import argparse
import os
import pwd
import random
import sys
import time
import urllib.request
from typing import Any, Callable, Iterable

SECRET_SUFFIX = "_secret"  # `apex-zmq keys` (zmq.auth) names secret key files NAME.key_secret
IMDS = "http://169.254.169.254/latest"
KEY_ATTR = "actor_index"  # the table's partition key (a number): see ActorSlots in the template
HOLDER_ATTR = "holder"    # the instance id holding that index
ALIVE_STATES = ("pending", "running")


# --- keys -------------------------------------------------------------------------------------------

def fetch_keys(ssm: Any, prefix: str, names: list[str], directory: str,
               owner: str | None = None) -> list[str]:
    """Write each ``prefix/name`` parameter to ``directory/name``; returns the paths written.

    Every name must exist (a role without its keys would only fail later, less clearly), and a
    secret key must be a SecureString: a plain String is stored unencrypted and readable by anyone
    allowed ssm:GetParameter without kms:Decrypt.
    """
    if not names or len(names) > 10:  # GetParameters takes at most 10 names
        raise SystemExit(f"fetch-keys: between 1 and 10 key names, got {len(names)}")
    for name in names:  # names are paths inside the key directory, e.g. authorized/client.key
        parts = name.split("/")
        if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise SystemExit(f"fetch-keys: {name!r} is not a relative path inside the key directory")
    full = {name: f"{prefix.rstrip('/')}/{name}" for name in names}
    resp = ssm.get_parameters(Names=list(full.values()), WithDecryption=True)
    if resp.get("InvalidParameters"):
        raise SystemExit("fetch-keys: not in Parameter Store: " + ", ".join(sorted(resp["InvalidParameters"]))
                         + " (upload them as deploy/README.md shows)")
    found = {p["Name"]: p for p in resp["Parameters"]}
    for name, param in full.items():
        if name.endswith(SECRET_SUFFIX) and found[param]["Type"] != "SecureString":
            raise SystemExit(f"fetch-keys: {param} is a {found[param]['Type']} parameter; a secret key "
                             "must be stored as a SecureString")
    uid = gid = -1
    if owner:
        entry = pwd.getpwnam(owner)
        uid, gid = entry.pw_uid, entry.pw_gid
    written = []
    for name, param in full.items():
        value = found[param]["Value"]
        path = os.path.join(directory, name)
        # The key directory and its subdirectories (authorized/) are 0700, as `apex-zmq keys` makes them.
        subdirs = name.split("/")[:-1]
        for depth in range(len(subdirs) + 1):
            d = os.path.join(directory, *subdirs[:depth])
            os.makedirs(d, mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)  # makedirs' mode is masked by the umask and ignored if it exists
            os.chown(d, uid, gid)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        # Created 0600 with O_EXCL: the secret never exists on disk with wider permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value if value.endswith("\n") else value + "\n")
        os.chown(tmp, uid, gid)
        os.replace(tmp, path)
        written.append(path)
    return written


# --- actor index ------------------------------------------------------------------------------------

def _holders(ddb: Any, table: str) -> dict[int, str]:
    """Every claimed index and its holder (a strongly consistent scan: the table has N items)."""
    out: dict[int, str] = {}
    for page in ddb.get_paginator("scan").paginate(TableName=table, ConsistentRead=True):
        for item in page["Items"]:
            out[int(item[KEY_ATTR]["N"])] = item[HOLDER_ATTR]["S"]
    return out


def _alive(ec2: Any, instance_ids: Iterable[str]) -> set[str]:
    """The ids among ``instance_ids`` of instances that are pending or running.

    A filter (not InstanceIds=) because an id that EC2 has forgotten must count as dead, not fail.
    """
    ids = sorted(set(instance_ids))
    alive: set[str] = set()
    for i in range(0, len(ids), 199):  # a filter takes at most 200 values
        pages = ec2.get_paginator("describe_instances").paginate(Filters=[
            {"Name": "instance-id", "Values": ids[i:i + 199]},
            {"Name": "instance-state-name", "Values": list(ALIVE_STATES)}])
        for page in pages:
            for reservation in page["Reservations"]:
                alive.update(inst["InstanceId"] for inst in reservation["Instances"])
    return alive


def _put(ddb: Any, table: str, index: int, me: str, condition: str, values: dict[str, Any]) -> bool:
    """Write ``index -> me`` if ``condition`` holds (atomically); False if another claim won."""
    # DynamoDB rejects attribute-name placeholders that the expression does not use.
    names = {k: v for k, v in (("#k", KEY_ATTR), ("#h", HOLDER_ATTR)) if k in condition}
    try:
        ddb.put_item(TableName=table,
                     Item={KEY_ATTR: {"N": str(index)}, HOLDER_ATTR: {"S": me}},
                     ConditionExpression=condition, ExpressionAttributeNames=names,
                     **({"ExpressionAttributeValues": values} if values else {}))
        return True
    except ddb.exceptions.ConditionalCheckFailedException:
        return False


def claim_actor_index(ddb: Any, ec2: Any, table: str, count: int, me: str, timeout_s: float = 1800.0,
                      poll_s: float = 15.0, sleep: Callable[[float], None] = time.sleep,
                      clock: Callable[[], float] = time.monotonic) -> int:
    """The lowest index in 0..count-1 this instance holds or can claim; waits while all are held.

    Order of preference: an index this instance already holds (a reboot keeps its index), then a
    never-claimed index, then the index of a holder that is no longer pending or running (the
    Auto Scaling group replaced it). Indices >= count (left over from a larger group) are ignored.
    """
    if count < 1:
        raise SystemExit(f"claim-actor-index: --count must be >= 1, got {count}")
    end = clock() + timeout_s
    while True:
        holders = {i: h for i, h in _holders(ddb, table).items() if i < count}
        mine = sorted(i for i, h in holders.items() if h == me)
        if mine:
            return mine[0]
        for index in range(count):
            if index not in holders and _put(ddb, table, index, me, "attribute_not_exists(#k)", {}):
                return index
        alive = _alive(ec2, holders.values())
        for index in sorted(i for i, h in holders.items() if h not in alive):
            if _put(ddb, table, index, me, "#h = :old", {":old": {"S": holders[index]}}):
                return index
        if clock() >= end:
            raise SystemExit(f"claim-actor-index: all {count} indices are held by running instances "
                             f"after {timeout_s:.0f} s; is the group larger than ActorCount?")
        # Jitter so that instances booted together do not retry in lockstep.
        sleep(poll_s * (1 + random.random()))


def write_env_file(path: str, index: int) -> None:
    """``APEX_ACTOR_INDEX=index`` for the actor unit's EnvironmentFile= (written atomically)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(f"APEX_ACTOR_INDEX={index}\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def instance_id_from_imds(timeout: float = 5.0) -> str:
    """This instance's id from the instance metadata service (IMDSv2: token first)."""
    req = urllib.request.Request(f"{IMDS}/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    token = urllib.request.urlopen(req, timeout=timeout).read().decode()
    req = urllib.request.Request(f"{IMDS}/meta-data/instance-id", headers={"X-aws-ec2-metadata-token": token})
    return urllib.request.urlopen(req, timeout=timeout).read().decode()


# --- command line -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="host.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("fetch-keys", help="CURVE key files from SSM Parameter Store")
    k.add_argument("--region", required=True)
    k.add_argument("--prefix", required=True, help="parameter path holding the key files, e.g. /apex-zmq/keys")
    k.add_argument("--names", required=True, help="comma-separated paths in the key directory, e.g. server.key,authorized/client.key")
    k.add_argument("--dir", required=True, help="directory to write (made 0700)")
    k.add_argument("--owner", help="user that will own the directory and files (the role's service user)")
    c = sub.add_parser("claim-actor-index", help="a unique actor index from the stack's DynamoDB table")
    c.add_argument("--region", required=True)
    c.add_argument("--table", required=True)
    c.add_argument("--count", type=int, required=True, help="actors in the run (--num-actors)")
    c.add_argument("--env-file", required=True)
    c.add_argument("--instance-id", help="default: this instance's, from the metadata service")
    c.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait while every index is held")
    args = p.parse_args(argv)

    import boto3  # here, so that --help works without it

    if args.command == "fetch-keys":
        names = [n for n in args.names.split(",") if n]
        paths = fetch_keys(boto3.client("ssm", region_name=args.region), args.prefix, names, args.dir, args.owner)
        print(f"fetch-keys: wrote {len(paths)} key files to {args.dir}")
    else:
        me = args.instance_id or instance_id_from_imds()
        index = claim_actor_index(boto3.client("dynamodb", region_name=args.region),
                                  boto3.client("ec2", region_name=args.region),
                                  args.table, args.count, me, timeout_s=args.timeout)
        write_env_file(args.env_file, index)
        print(f"claim-actor-index: {me} is actor {index} of {args.count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
