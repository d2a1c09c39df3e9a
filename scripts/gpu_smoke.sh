#!/usr/bin/env bash
# Every training path of vqkit on the machine's GPU for a few steps, each ending in its evaluation: what the CPU
# tests cannot catch (bf16 autocast on CUDA, device placement of the discriminator, the perceptual network, the
# KV cache, resume with CUDA RNG state). CI has no GPU; run this by hand on one. It is a smoke test, not a
# benchmark: the seconds per step it prints are for sizing runs, and the scores of a few hundred steps mean little.
#
#   bash scripts/gpu_smoke.sh [OUT]          # default OUT: runs/gpu-smoke
#   SMOKE_SCALE=0.02 bash scripts/gpu_smoke.sh /tmp/smoke   # a few steps of each, to check the script on a CPU
set -euo pipefail
out=${1:-runs/gpu-smoke}
scale=${SMOKE_SCALE:-1}
n() { python3 -c "print(max(2, int($1 * $scale)))"; }  # a step count, scaled
v() { echo "\$ vqkit $*"; SECONDS=0; python3 -m vqkit.cli "$@"; echo "  ($SECONDS s)"; }
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU: CPU')"

# VQGAN on MNIST: discriminator and its term both on early; stopped half-way, then resumed to the end
gan="gan.disc_start=$(n 100) gan.gen_start=$(n 150) ckpt_every=$(n 100)"
v train tokenizer --data mnist5k --preset mnist-vqgan --out "$out/vqgan" --steps "$(n 400)" --stop-at "$(n 200)" $gan
v train tokenizer --out "$out/vqgan" --resume
v eval tokenizer --model "$out/vqgan" --data mnist5k

# the photos VQGAN at its own size (64 base channels, EfficientNet-Lite0 perceptual term): seconds per step
v train tokenizer --data photos --preset photos-vqgan-f8 --out "$out/photos" --steps "$(n 300)" \
    gan.disc_start=$(n 100) gan.gen_start=$(n 200) ckpt_every=$(n 300)
v eval tokenizer --model "$out/photos" --data photos

# both priors over the VQGAN's tokens, sampled and evaluated
for mode in ar mask; do
    v train prior --tokenizer "$out/vqgan" --data mnist5k --mode "$mode" --preset "mnist-prior-$mode" \
        --out "$out/prior-$mode" --steps "$(n 300)"
    v sample --prior "$out/prior-$mode" --class 3 --n 16 --seed 0 --out "$out/prior-$mode/threes.png"
    v eval samples --prior "$out/prior-$mode" --data mnist5k --per-class 20
done

# text conditioning on shapes, and the GAN baseline
v train tokenizer --data shapes --preset shapes-vqvae --out "$out/shapes-tok" --steps "$(n 300)"
v train prior --tokenizer "$out/shapes-tok" --data shapes --preset shapes-prior-ar --out "$out/shapes-prior" \
    --steps "$(n 300)"
v sample --prior "$out/shapes-prior" --text "a red circle at the top left" --n 8 --out "$out/shapes-prior/red.png"
v train gan --data mnist5k --out "$out/gan" --steps "$(n 300)"
v eval samples --gan "$out/gan" --data mnist5k --per-class 20
echo "gpu smoke: all stages ran"
