#!/usr/bin/env bash
# The GPU check (tools/gpu_check.py) on a GPU node without internet, such as Jean Zay's compute nodes, in two steps:
#
#   tools/gpu-check.sh prepare WHEELHOUSE [--python 3.11] [--platform manylinux_2_28_x86_64] [--torch SPEC]
#                                         [--extras deepspeed,liger] [--cache DIR]
#     on a machine that reaches the package registry (a login node): into WHEELHOUSE, every wheel the check
#     installs, dependencies included, for the GPU node's Python and platform: torch as --torch says (default: the
#     version constraints.txt pins, which PyPI serves as its CUDA build, several GB), DeepSpeed built as a wheel
#     (it is source-only on the registry; DS_BUILD_OPS=0: its kernels compile on first use), llmft itself built from
#     this checkout, every other version as constraints.txt pins it; requirements.txt (each wheel, pinned, with its
#     sha256), manifest.json (the target, the sizes, llmft's commit) and a copy of this script and gpu_check.py.
#   tools/gpu-check.sh run WHEELHOUSE [--cpu] [--out FILE] [--budget-s 480] [--venv DIR]
#     on the GPU node (copy WHEELHOUSE there; a clone is not needed: `bash WHEELHOUSE/gpu-check.sh run WHEELHOUSE`):
#     a fresh venv, `pip install --no-index` of requirements.txt from WHEELHOUSE alone, then the checks within
#     --budget-s seconds: the results in FILE (default ./gpu-check.json) and as a table. --cpu: the same checks on
#     the CPU, which tests the two steps on a machine without a GPU.
#
# What each figure means: docs/gpu-check.md. Exit status: 0 when every check passed (or was skipped), 1 else.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

die() { echo "gpu-check: $*" >&2; exit 2; }

usage() {
    sed -n '2,/^set -/{/^#/p}' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

step() {  # step LOG DESCRIPTION COMMAND...: one line per step, the command's output in LOG (its end on failure)
    local log=$1 what=$2 started=$SECONDS
    shift 2
    printf 'gpu-check: %s ... ' "$what"
    echo "== $what: $*" >>"$log"
    if ! "$@" >>"$log" 2>&1; then
        echo "failed"
        tail -n 25 "$log" | sed 's/^/    /' >&2
        die "$what failed (the whole output: $log)"
    fi
    echo "$((SECONDS - started)) s"
}

pinned() {  # the version constraints.txt pins for a package
    sed -n "s/^$1==//p" "$here/../constraints.txt"
}

platform_tags() {  # a manylinux tag and every older one the same machine accepts (pip does not expand them itself)
    local tag=$1 glibc_minor arch minor
    case $tag in
        manylinux2014_*) glibc_minor=17 arch=${tag#manylinux2014_} ;;
        manylinux_2_*_*) glibc_minor=${tag#manylinux_2_}; glibc_minor=${glibc_minor%%_*}
                         arch=${tag#manylinux_2_"$glibc_minor"_} ;;
        *) die "--platform $tag: give a manylinux tag, such as manylinux_2_28_x86_64 (glibc 2.28 or later)" ;;
    esac
    for ((minor = glibc_minor; minor >= 5; minor--)); do echo "--platform=manylinux_2_${minor}_$arch"; done
    ((glibc_minor < 17)) || echo "--platform=manylinux2014_$arch"
    ((glibc_minor < 12)) || echo "--platform=manylinux2010_$arch"
    echo "--platform=manylinux1_$arch"
}

prepare() {
    local wheelhouse="" python_version=3.11 platform=manylinux_2_28_x86_64 torch="" extras=deepspeed,liger cache=""
    while (($#)); do
        case $1 in
            --python) python_version=${2:?}; shift 2 ;;
            --platform) platform=${2:?}; shift 2 ;;
            --torch) torch=${2:?}; shift 2 ;;
            --extras) extras=${2:?}; shift 2 ;;
            --cache) cache=${2:?}; shift 2 ;;
            -*) usage ;;
            *) [ -z "$wheelhouse" ] || usage; wheelhouse=$1; shift ;;
        esac
    done
    [ -n "$wheelhouse" ] || usage
    [ -f "$here/../constraints.txt" ] && git -C "$here/.." rev-parse --git-dir >/dev/null 2>&1 \
        || die "prepare builds llmft from its source: run it as tools/gpu-check.sh in a git clone of llmft"
    # pip reads the packages' markers (python_version, platform_machine) with the Python that runs it, whatever
    # --python-version and --platform say (pip issue 11664): it must be the GPU node's Python on the same machine type
    local python=${PYTHON:-python$python_version} actual
    command -v "$python" >/dev/null \
        || die "no $python here: prepare needs the GPU node's Python ($python_version);" \
               "set PYTHON=/path/to/python$python_version, or give the node's version with --python X.Y"
    actual=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$actual" = "$python_version" ] \
        || die "$python is Python $actual, the GPU node's is $python_version (--python):" \
               "set PYTHON to a Python $python_version"
    [[ $platform == *_"$(uname -m)" ]] \
        || die "--platform $platform is for another machine type than this $(uname -m) one:" \
               "prepare on a machine of the GPU node's type"
    local platforms
    platforms=$(platform_tags "$platform")
    torch=${torch:-torch==$(pinned torch)}
    local deepspeed_version
    deepspeed_version=$(pinned deepspeed)

    if [ -e "$wheelhouse" ] && [ -n "$(ls -A "$wheelhouse")" ]; then
        # a wheelhouse of an earlier prepare, finished or not, is made anew; any other folder is left alone
        [ -f "$wheelhouse/manifest.json" ] || [ -f "$wheelhouse/prepare.log" ] \
            || die "$wheelhouse is not empty and is no wheelhouse (no manifest.json): give an empty or new folder"
        rm -f "$wheelhouse"/*.whl "$wheelhouse"/{requirements.txt,manifest.json,prepare.log,gpu_check.py,gpu-check.sh}
    fi
    mkdir -p "$wheelhouse"
    wheelhouse=$(cd "$wheelhouse" && pwd)
    local build log=$wheelhouse/prepare.log started=$SECONDS
    build=$(mktemp -d "${TMPDIR:-/tmp}/llmft-gpu-prepare.XXXXXX")
    trap "rm -rf '$build'" EXIT
    cache=${cache:-$build/downloads}
    mkdir -p "$cache" "$build/src" "$build/wheels"
    cache=$(cd "$cache" && pwd)
    : >"$log"

    # llmft from the files git knows (tracked, and new ones it does not ignore): no build/ of an earlier build, no venv
    (cd "$here/.." && git ls-files -z --cached --others --exclude-standard) \
        | (cd "$here/.." && tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null) \
        | tar -C "$build/src" -xf -
    step "$log" "llmft wheel" "$python" -m pip wheel --no-deps --wheel-dir "$build/wheels" "$build/src"
    # not the pip cache: a wheel cached from a build with DS_BUILD_OPS=1 would hold kernels for another machine
    step "$log" "deepspeed $deepspeed_version wheel (DS_BUILD_OPS=0)" env DS_BUILD_OPS=0 "$python" -m pip wheel \
        --no-deps --no-cache-dir --no-binary deepspeed --wheel-dir "$build/wheels" "deepspeed==$deepspeed_version"
    local llmft_wheel deepspeed_wheel
    llmft_wheel=$(ls "$build"/wheels/llmft-*.whl)
    deepspeed_wheel=$(ls "$build"/wheels/deepspeed-*.whl)
    # pip itself (the run step installs the venv's pip from here) and nvidia-ml-py (DeepSpeed's GPU memory
    # figures; its own wheel lists it only when built on a CUDA machine)
    local requirements=("$llmft_wheel[$extras]" "$deepspeed_wheel" "$torch" nvidia-ml-py pip)
    grep -v -E '^(torch|deepspeed|llmft)==' "$here/../constraints.txt" >"$build/constraints.txt"
    # pip resolves for the target platform only among wheels (--only-binary), and the registry has some
    # dependencies as source only (antlr4-python3-runtime 4.9.3, hydra's). So: from the download cache alone first
    # (a second prepare downloads nothing); when it lacks something, everything is resolved for this machine, which
    # downloads each file once and builds a wheel of each source-only dependency, and the target's resolution then
    # fetches the few wheels it needs besides (a platform this machine's pip did not pick). Not both from the
    # registry at once: among equal files pip takes the registry's, and would download everything again.
    local target=("$python" -m pip download --dest "$wheelhouse" --only-binary=:all: $platforms
                  --python-version "$python_version" --implementation cp --abi "cp${python_version/./}"
                  -c "$build/constraints.txt")
    local attempt=$build/attempt.log missing resolved_here="" tried=" "
    printf 'gpu-check: wheels for Python %s on %s ... ' "$python_version" "$platform"
    until "${target[@]}" --no-index --find-links "$cache" "${requirements[@]}" >"$attempt" 2>&1; do
        cat "$attempt" >>"$log"
        if [ -z "$resolved_here" ]; then
            echo "not all in the cache"
            step "$log" "dependencies (resolved here)" "$python" -m pip wheel --wheel-dir "$cache" \
                --find-links "$cache" -c "$build/constraints.txt" "${requirements[@]}"
            resolved_here=yes
        else
            echo "some need another file"
            # what the cache lacks for the target: pip names it as not found, or as a constraint it cannot meet
            local new=()
            while read -r missing; do
                [[ -z $missing || $tried == *" $missing "* ]] || new+=("$missing")
            done < <(sed -n -e 's/^ERROR: No matching distribution found for //p' \
                            -e 's/^ *The user requested (constraint) //p' "$attempt" | sort -u)
            ((${#new[@]})) || {
                tail -n 25 "$attempt" | sed 's/^/    /' >&2
                die "no wheels for Python $python_version on $platform that fit together (the whole output: $log)"
            }
            step "$log" "${new[*]} for the target" "${target[@]}" --dest "$cache" --no-deps "${new[@]}"
            tried="$tried${new[*]} "
        fi
        printf 'gpu-check: wheels for Python %s on %s ... ' "$python_version" "$platform"
    done
    cat "$attempt" >>"$log"
    echo "done"
    cp "$here/gpu_check.py" "$here/gpu-check.sh" "$wheelhouse/"
    local commit
    commit=$(git -C "$here/.." describe --always --dirty 2>/dev/null || echo unknown)
    "$python" - "$wheelhouse" "$python_version" "$platform" "$torch" "$extras" "$commit" <<'EOF'
import hashlib, json, sys, time
from pathlib import Path

wheelhouse, python_version, platform, torch, extras, commit = sys.argv[1:]
wheels = []
for path in sorted(Path(wheelhouse).glob("*.whl")):
    name, version = path.name.split("-")[:2]
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    wheels.append({"file": path.name, "name": name, "version": version, "bytes": path.stat().st_size,
                   "sha256": digest.hexdigest()})
# --require-hashes: the run step installs these files and nothing else, each as it was here
Path(wheelhouse, "requirements.txt").write_text(
    "# made by tools/gpu-check.sh prepare: every wheel of this folder, pinned, with its sha256\n"
    + "".join(f"{w['name']}=={w['version']} --hash=sha256:{w['sha256']}\n" for w in wheels))
manifest = {"made": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": python_version, "platform": platform,
            "torch": torch, "extras": extras, "llmft_commit": commit, "num_wheels": len(wheels),
            "bytes": sum(w["bytes"] for w in wheels), "wheels": wheels}
Path(wheelhouse, "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
print(f"gpu-check: {len(wheels)} wheels, {manifest['bytes'] / 2**20:,.0f} MiB in {wheelhouse}")
EOF
    echo "gpu-check: prepared in $((SECONDS - started)) s; on the GPU node:" \
         "bash $wheelhouse/gpu-check.sh run $wheelhouse"
}

run() {
    local wheelhouse="" cpu="" out=gpu-check.json budget=480 venv=""
    while (($#)); do
        case $1 in
            --cpu) cpu=--cpu; shift ;;
            --out) out=${2:?}; shift 2 ;;
            --budget-s) budget=${2:?}; shift 2 ;;
            --venv) venv=${2:?}; shift 2 ;;
            -*) usage ;;
            *) [ -z "$wheelhouse" ] || usage; wheelhouse=$1; shift ;;
        esac
    done
    [ -n "$wheelhouse" ] || usage
    # the fresh venv sees nothing else: a module's PYTHONPATH (Jean Zay's pytorch-gpu sets one) would put its own
    # torch and transformers before the wheelhouse's
    unset PYTHONPATH PYTHONHOME
    [ -f "$wheelhouse/manifest.json" ] \
        || die "$wheelhouse holds no manifest.json: make it with tools/gpu-check.sh prepare $wheelhouse on a machine" \
               "with the package registry, then copy the folder here"
    wheelhouse=$(cd "$wheelhouse" && pwd)
    out=$(mkdir -p "$(dirname "$out")" && cd "$(dirname "$out")" && pwd)/$(basename "$out")
    local python_version python actual
    python_version=$(sed -n 's/^ "python": "\([0-9.]*\)",$/\1/p' "$wheelhouse/manifest.json")
    python=${PYTHON:-python$python_version}
    command -v "$python" >/dev/null \
        || die "no $python here: the wheelhouse is for Python $python_version" \
               "(load its module, or set PYTHON=/path/to/python$python_version)"
    actual=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$actual" = "$python_version" ] \
        || die "$python is Python $actual, the wheelhouse is for $python_version:" \
               "set PYTHON to a Python $python_version"
    local scratch log started=$SECONDS
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/llmft-gpu-check.XXXXXX")
    log=$scratch/install.log
    if [ -z "$venv" ]; then
        venv=$scratch/venv
    else
        [ ! -e "$venv" ] || die "--venv $venv exists: give a new folder (the check installs into a fresh venv)"
    fi
    step "$log" "fresh venv ($python)" "$python" -m venv --without-pip "$venv"
    local pip_wheel
    pip_wheel=$(ls "$wheelhouse"/pip-*.whl)
    # pip run from its wheel installs everything, itself included; PIP_CONFIG_FILE=/dev/null and --isolated: no
    # configuration file or PIP_* variable adds an index, a find-links folder or a constraint
    step "$log" "install from $wheelhouse alone (no index)" env PIP_CONFIG_FILE=/dev/null "$venv/bin/python" \
        "$pip_wheel/pip" --isolated install --no-index --find-links "$wheelhouse" --require-hashes --no-compile \
        --requirement "$wheelhouse/requirements.txt"
    echo "gpu-check: installed in $((SECONDS - started)) s; the checks, within $budget s:"
    # from a folder of its own, so that `python -m llmft...` imports the installed llmft, not a checkout in the
    # current folder; offline, as a compute node is. The outer limit only catches a check hung in-process: each
    # launch is given the time left in the budget by gpu_check.py itself.
    mkdir -p "$scratch/work"
    local status=0
    (cd "$scratch/work" && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 timeout --kill-after=30 $((budget + 60)) \
        "$venv/bin/python" "$wheelhouse/gpu_check.py" --out "$out" --work "$scratch/work" --budget-s "$budget" $cpu) \
        || status=$?
    ((status != 124 && status != 137)) \
        || echo "gpu-check: stopped after $((budget + 60)) s: the results so far are in $out" >&2
    echo "gpu-check: venv, runs and install log in $scratch (remove it when done)"
    return "$status"
}

case ${1:-} in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    *) usage ;;
esac
