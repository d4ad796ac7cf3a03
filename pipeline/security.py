"""Which URIs a job may touch, and keeping credentials out of everything it writes.

Manifests come from other teams, so every manifest URI is checked here, in the driver,
before anything reads or writes it: video and audio against the job config's
`security.allowed_input_prefixes`, output against `security.allowed_output_prefixes`.
A row that fails is reported and never enters the Ray graph.

Prefixes match whole path segments (`s3://bucket/in` admits `s3://bucket/in/a.mp4`, not
`s3://bucket/inbox/a.mp4`, and never `s3://bucket-evil/…`). A URI is admitted only if
every way of reading it lands under the prefix:
- object stores (s3:// …): the literal key (what S3 itself stores), the key with `.`,
  `..` and empty segments collapsed (what a normalising layer would send), and the same
  after percent-decoding; a key that climbs above the bucket root is refused;
- local files (plain paths, file://): the path as the operating system resolves it
  (os.path.realpath: `..`, `//`, `./` and symlinks), against the prefix resolved the same
  way. Local paths are admitted only by a local prefix, so a job on s3 with prefixes set
  rejects local paths unless one is listed.
Scheme case does not matter (S3:// is s3://; s3a:// is s3://).

With no prefixes set, a URI is admitted when its scheme is one of `allowed_schemes` (by
default local files and object stores: file, s3, gs, az, abfs; never http(s), whose URIs
would let a manifest make the workers fetch any address). A dub job, or its dry run
`validate`, run against a cluster (`--address`, or RAY_ADDRESS set) must set both prefix
lists: manifests there come from other teams (`job_policy`).

Credentials come from the environment or instance roles only. A URI carrying any
user-info (`s3://KEY:SECRET@bucket/…`, `https://user:pass@host/…`) is refused whatever
the prefixes, and `redact` removes user-info from any text before it is reported.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote


class PolicyError(ValueError):
    """A URI the job configuration or the security policy does not allow."""


# scheme://userinfo@rest. Secret keys may contain "/" (AWS's do), which a URL parser would
# take for the end of the authority, so "user:anything@" up to the first "@" counts too.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s@/?#]*@|[^\s@]*:[^\s@]*@)")


def redact(text: str) -> str:
    """`text` with the user-info of every URL in it replaced by `***@`."""
    return _USERINFO.sub(lambda m: m.group("scheme") + "***@", text)


def has_credentials(uri: str) -> bool:
    """True for anything `redact` would hide (a key like "a:b@c" errs on the safe side)."""
    match = _USERINFO.match(uri.strip())
    return match is not None


@dataclass(frozen=True)
class Location:
    """A URI reduced to what decides where it points."""

    scheme: str  # "file" for local paths
    authority: str  # bucket (lower-case) for object stores, "" for files
    paths: tuple[str, ...]  # every reading of the path; files: one absolute resolved path

    def display(self) -> str:
        return self.paths[0] if self.scheme == "file" else f"{self.scheme}://{self.authority}/{self.paths[0]}"


def _scheme_and_rest(uri: str) -> tuple[str, str]:
    scheme, sep, rest = uri.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme):
        return "file", uri
    scheme = scheme.lower()
    if scheme == "s3a":
        scheme = "s3"
    return scheme, rest


def _collapse(key: str) -> str | None:
    """Key with `.`, `..` and empty segments collapsed; None if it climbs above the root."""
    parts: list[str] = []
    for seg in key.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not parts:
                return None
            parts.pop()
            continue
        parts.append(seg)
    return "/".join(parts)


def locate(uri: str) -> Location:
    """Where `uri` points. Raises PolicyError for URIs that carry credentials or that no
    reading can place."""
    if has_credentials(uri):
        raise PolicyError(f"{redact(uri)}: URIs must not carry credentials (user-info before '@'); credentials come from the environment or instance roles")
    scheme, rest = _scheme_and_rest(uri)
    if scheme == "file":
        path = rest
        if path.startswith("localhost/"):
            path = path[len("localhost") :]
        if not path:
            raise PolicyError(f"{uri}: empty path")
        return Location("file", "", (os.path.realpath(path),))
    authority, _, key = rest.partition("/")
    authority = authority.lower()
    if not authority:
        raise PolicyError(f"{uri}: no bucket or host")
    readings = [key]  # S3 stores keys literally: "//in/a" is not "in/a"
    for k in (key, unquote(key)):
        collapsed = _collapse(k)
        if collapsed is None:
            raise PolicyError(f"{uri}: '..' climbs above the root of {scheme}://{authority}")
        readings.append(collapsed)
    return Location(scheme, authority, tuple(dict.fromkeys(readings)))


def _under(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return prefix == "" or path == prefix or path.startswith(prefix + "/")


def _admits(prefix: Location, loc: Location) -> bool:
    if (prefix.scheme, prefix.authority) != (loc.scheme, loc.authority):
        return False
    if loc.scheme == "file":
        return _under(loc.paths[0], prefix.paths[0])
    # the prefix's own collapsed form: "s3://b/in/" and "s3://b/in" are one prefix
    base = prefix.paths[-1]
    return all(_under(p, base) for p in loc.paths)


# Where URIs may point when no prefixes are set: local files and object stores. Never
# http(s) and the like: a manifest URI such as http://169.254.169.254/... would otherwise
# make the workers fetch whatever it names (a blind SSRF).
DEFAULT_SCHEMES = ("file", "s3", "gs", "gcs", "az", "abfs", "abfss")


class URIPolicy:
    """Allowed input and output prefixes; None admits every URI of `schemes` (the laptop
    default: local files and object stores)."""

    def __init__(self, allowed_input_prefixes: list[str] | None = None, allowed_output_prefixes: list[str] | None = None,
                 schemes: tuple[str, ...] | list[str] = DEFAULT_SCHEMES):
        self.inputs = None if allowed_input_prefixes is None else [(p, locate(p)) for p in allowed_input_prefixes]
        self.outputs = None if allowed_output_prefixes is None else [(p, locate(p)) for p in allowed_output_prefixes]
        self.schemes = tuple(s.lower() for s in schemes)

    def check(self, uri: str, kind: str) -> str | None:
        """None when `uri` may be used as `kind` ("video", "audio" = input, "output"), else
        the reason, naming the URI (redacted) and the rule."""
        try:
            loc = locate(uri)
        except PolicyError as e:
            return f"{kind}_uri {e}"
        output = kind == "output"
        rules = self.outputs if output else self.inputs
        if rules is None:
            if loc.scheme in self.schemes:
                return None
            return (f"{kind}_uri {redact(uri)}: scheme {loc.scheme}:// is not allowed (security.allowed_schemes: "
                    f"{', '.join(self.schemes)}); list it there, or set allowed prefixes")
        if any(_admits(prefix, loc) for _, prefix in rules):
            return None
        setting = "allowed_output_prefixes" if output else "allowed_input_prefixes"
        listed = ", ".join(p for p, _ in rules) or "(none)"
        shown = redact(uri)
        resolved = loc.display()
        where = f" (resolves to {resolved})" if resolved != shown else ""
        return f"{kind}_uri {shown}{where} is outside security.{setting}: {listed}"

    def canonical(self, uri: str) -> str:
        """The form the job uses after the check: what was checked is what gets opened
        (local paths resolved; scheme lower-case). URIs pass unchanged with no rules."""
        if self.inputs is None and self.outputs is None:
            return uri
        loc = locate(uri)
        if loc.scheme == "file":
            return loc.paths[0]
        return f"{loc.scheme}://{loc.authority}/{loc.paths[0]}"


def on_cluster(address: str | None) -> bool:
    """Whether a job runs against a cluster: `--address`, or RAY_ADDRESS as inside `ray job submit`."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def job_policy(job: str, security, job_uris: dict[str, str | None], address: str | None = None,
               cluster_needs_prefixes: bool = True) -> URIPolicy:
    """The checks a job makes before it opens anything, and its URIPolicy for the rows.
    `security` is the job config's SecurityConfig; `job_uris` the job's own URIs by role
    ({"manifest": ..., "report": ...}; None where not given), which must carry no
    credentials. Against a cluster (`address`, or RAY_ADDRESS as inside `ray job submit`) a
    job whose manifests come from other teams (`cluster_needs_prefixes`) refuses to start
    without both prefix lists: a dry run too, or it would probe what the real run refuses."""
    for what, uri in job_uris.items():
        if uri and has_credentials(uri):
            raise PolicyError(f"{what} {redact(uri)}: URIs must not carry credentials; they come from the environment or instance roles")
    if (cluster_needs_prefixes and on_cluster(address)
            and (security.allowed_input_prefixes is None or security.allowed_output_prefixes is None)):
        raise PolicyError(f"a {job} job run against a cluster (--address or RAY_ADDRESS) needs security.allowed_input_prefixes "
                          "and security.allowed_output_prefixes in its config: manifests there come from other teams "
                          "(deploy/job.cluster.yaml shows them)")
    return URIPolicy(security.allowed_input_prefixes, security.allowed_output_prefixes, security.allowed_schemes)
