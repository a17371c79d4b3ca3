"""Why boundary-distance detection misses some BadNets poison: distance quantiles, the brightness next to
the patch for near vs far poison, and the logit-margin AUROC, from a finished BURN run's scan checkpoint.

    cd <workdir> && python <repo>/experiments/diagnose_badnet_detection.py badnet_cifar10_smallcnn_e16

The numbers quoted in docs/burn.md (CPU results) come from this script.
"""
import collections
import sys

import torch

from burnkit.records import read_attack_record
from burnkit.safe_load import safe_torch_load
from burnkit.metrics import auroc
rec = sys.argv[1]
scan = safe_torch_load(f"record/{rec}/defense/burn/checkpoint/burn_scan.pt", what="BURN scan")
r = scan["result"]; logits0 = scan["logits0"]
d = read_attack_record(f"record/{rec}").load_data("./data").bd_train
flags, lab, orig, l2, adv = d.poison, d.labels, d.original_labels, r["l2"], r["adv_label"]
pred = logits0.argmax(1)
target = int(lab[flags].mode().values)  # all2one: the label every poisoned sample carries
print("auroc", auroc(l2, flags))
q = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5])
print("poison q", [round(v, 3) for v in l2[flags].quantile(q).tolist()])
low = flags & (l2 < l2[flags].quantile(0.2))
print("low-poison n", int(low.sum()), "pred==target share", float((pred[low] == target).float().mean()),
      "orig==target share", float((orig[low] == target).float().mean()))
hi = flags & (l2 >= l2[flags].quantile(0.5))
print("hi-poison pred==target share", float((pred[hi] == target).float().mean()))
# corner brightness of the original region? trigger is the 3x3 white patch; look at the 3x3 neighbours outside it
img = d.images
nb = img[:, :, 26:29, 26:32].float().mean(dim=(1, 2, 3))  # pixels just above the patch
print("mean brightness above patch: low-poison", float(nb[low].mean()), "hi-poison", float(nb[hi].mean()))
# margin of target logit
z = logits0.topk(2, 1).values; margin = z[:, 0] - z[:, 1]
print("margin low-poison", float(margin[low].median()), "hi-poison", float(margin[hi].median()), "clean", float(margin[~flags].median()))
print("auroc margin", auroc(margin, flags))
# clean with large l2
top = torch.argsort(l2, descending=True)[:len(l2) // 20]
print("top-5% precision", float(flags[top].float().mean()), "clean-in-top pred", collections.Counter(pred[top][~flags[top]].tolist()).most_common(4))
