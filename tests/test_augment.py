import torch

from cnnlab.training.augment import augment, random_flip, random_shift


def test_shift_moves_each_image_within_bounds_and_keeps_its_pixels():
    torch.manual_seed(0)
    images = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 10:18, 10:18] = 255  # an 8x8 square in the middle
    shifted = random_shift(images, 2)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    assert (shifted.sum(dim=(1, 2, 3)) == images.sum(dim=(1, 2, 3))).all()  # nothing falls off the edge
    rows = shifted[:, 0].amax(dim=2).float().argmax(dim=1)  # first ink row of each image
    assert set(rows.tolist()) <= set(range(8, 13)) and len(set(rows.tolist())) > 1


def test_shift_matches_a_plain_python_reference():
    torch.manual_seed(3)
    images = torch.randint(0, 256, (5, 2, 6, 7), dtype=torch.uint8)
    state = torch.get_rng_state()
    shifted = random_shift(images, 1)
    torch.set_rng_state(state)
    dy, dx = torch.randint(0, 3, (5, 1)), torch.randint(0, 3, (5, 1))
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    for i in range(5):
        expected = padded[i, :, dy[i, 0]:dy[i, 0] + 6, dx[i, 0]:dx[i, 0] + 7]
        assert torch.equal(shifted[i], expected)


def test_flip_mirrors_about_half():
    torch.manual_seed(0)
    images = torch.arange(28, dtype=torch.uint8).repeat(200, 1, 28, 1)  # each row 0..27
    flipped = random_flip(images)
    mirrored = (flipped[:, 0, 0, 0] == 27).float().mean().item()
    assert 0.35 < mirrored < 0.65
    assert torch.equal(augment(images), images)  # no augmentation configured: unchanged
