"""Language from the student: captions of point clouds through ClipCap's GPT-2
(:mod:`cd2p.language.captioning`), zero-shot classification through CLIP's text tower
(:mod:`cd2p.language.zeroshot`) and the contact sheet that shows teacher and student captions
side by side (:mod:`cd2p.language.contact_sheet`)."""
