"""Looking inside runs: pictures (`figures`), learned kernels and feature maps (`activations`),
saliency (`saliency`), the `cnnlab show` library (`show`), the HTML report (`report`) and the
table of runs (`run_table`)."""
