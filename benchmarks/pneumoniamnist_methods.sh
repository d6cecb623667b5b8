set -e
cd "$(dirname "$0")/.."
D=../shared/data/pneumoniamnist-trainval.npz
ltc train --model small_cnn --width 0.5 --data $D --epochs 8 --lr 0.05 --out runs/pneu_base --no-progress --threads 2 --overwrite
for m in ltc oneshot lrc vbmf uniform; do
  ltc compress --base runs/pneu_base --data $D --method $m --target-sr 5 --steps 3 --epochs-per-step 1 --finetune-epochs 3 --out runs/pneu_$m --no-progress --threads 2 --overwrite
done
ltc report runs/pneu_base runs/pneu_ltc runs/pneu_oneshot runs/pneu_lrc runs/pneu_vbmf runs/pneu_uniform --compare --out benchmarks/results/pneumoniamnist_methods_report
