#!/usr/bin/env python3
"""decode_pool_profile: the thread pool's jobs in a batch-1 decode, call site by call site.

The llama model of compare_decode.py (Q4_0, ~90M parameters by default) decodes --gen-tokens tokens greedily
after a --prompt-tokens prompt, --reps times, with FLASHLM_POOL_PROFILE set: the library records every
parallel_for (rdtsc) and writes, per call site, the number of jobs and the medians of their time (total = the
caller's own share + its wait for the workers' last units), how long the first worker took to join, the serial
time since the previous job ended, and the mean threads that took part. The prompts' prefill jobs are counted
too (their sites are the same; a site's count over the decode steps says how many jobs a step holds).
Sites are the functions that called parallel_for, named with addr2line from --symbols, the unstripped library
of the same build (the installed copy keeps exported names only), e.g. build/wt/csrc/libflashlm.so.0.1.0.

  python bench/decode_pool_profile.py --threads 2 --symbols build/wt/csrc/libflashlm.so.0.1.0
  python bench/decode_pool_profile.py --threads 1 --symbols build/wt/csrc/libflashlm.so.0.1.0
"""

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_decode  # noqa: E402  (this process runs no kernels: the child, whose environment sets the profile, does)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--type", default="Q4_0")
    compare_decode.shape_arguments(p)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--symbols", help="the unstripped libflashlm.so of the build that runs (names the sites)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "profile.txt")
        env = dict(os.environ, FLASHLM_POOL_PROFILE=out, FLASHLM_NUM_THREADS=str(args.threads))
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", "1"], env=env, check=True)
        print(f"{args.threads} thread(s), load {os.getloadavg()[0]:.1f} (after the run)")
        for line in open(out):
            print(resolve(line.rstrip("\n"), args.symbols))


def resolve(line, symbols):
    """The site column 'lib+0xoffset name' as the function's name (addr2line), where the tool is present."""
    if line.startswith("#") or "+0x" not in line:
        return line
    head, site = line[:line.rindex("  ") + 2], line[line.rindex("  ") + 2:]
    lib, rest = site.split("+0x", 1)
    offset = rest.split(" ", 1)[0]
    try:
        name = subprocess.run(["addr2line", "-f", "-C", "-e", symbols or lib, hex(int(offset, 16) - 1)], capture_output=True,
                              text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return line
    return head + os.path.basename(lib) + ": " + name[:110]


def child(args):
    import torch

    from flashlm import ops
    from flashlm.runtime.engine import LLM
    from flashlm.runtime.sampling_params import SamplingParams

    torch.set_num_threads(args.threads)
    ops.set_num_threads(args.threads)
    args.n_expert = args.n_expert_used = 0
    args.moe_d_ff = None
    with tempfile.TemporaryDirectory() as folder:
        path, _ = compare_decode.make_gguf(folder, args, args.type, "llama")
        llm = LLM(path, max_num_seqs=1, enable_prefix_caching=False)
        g = torch.Generator().manual_seed(2)
        prompt = torch.randint(0, llm.model.cfg.vocab_size, (args.prompt_tokens,), generator=g).tolist()
        params = SamplingParams(temperature=0, max_tokens=args.gen_tokens, ignore_eos=True)
        for _ in range(args.reps):
            llm.generate(prompt, params)


if __name__ == "__main__":
    main()
