"""What judges an image: face detection (interface, MTCNN), crops and alignment, the attribute classifier,
the face feature net and face bank, the CLIP / DINOv2 towers, the miniature scene classifier, and loading
them from a config."""
