import math

import pytest
import torch

from cnnlab.training.augment import augment, random_flip, random_rotate, random_shift, rotate

pytestmark = pytest.mark.unit  # every test here is in-process and quick


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


def test_a_quarter_turn_is_exactly_rot90_and_a_zero_turn_changes_nothing():
    images = torch.randint(0, 256, (3, 2, 6, 6), dtype=torch.uint8)
    quarter = rotate(images, torch.full((3,), math.pi / 2))
    assert torch.equal(quarter, torch.rot90(images, 1, (2, 3)))  # counter-clockwise as the image is seen
    assert torch.equal(rotate(images, torch.zeros(3)), images)
    assert torch.equal(random_rotate(images, 0), images)


def test_random_rotations_stay_within_the_angle_and_keep_a_centred_digit():
    torch.manual_seed(0)
    images = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 4:24, 13:15] = 255  # a vertical bar through the centre: its tilt is the angle
    turned = random_rotate(images, 15)
    assert turned.dtype == torch.uint8 and turned.shape == images.shape
    assert not torch.equal(turned, images)
    ink = turned[:, 0].float()
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    mass = ink.sum(dim=(1, 2))
    assert torch.allclose(mass, images[:, 0].float().sum(dim=(1, 2)), rtol=0.03)  # nothing falls off
    cy, cx = (ink * rows).sum(dim=(1, 2)) / mass, (ink * cols).sum(dim=(1, 2)) / mass
    assert (cy - 13.5).abs().max() < 0.3 and (cx - 13.5).abs().max() < 0.3  # turned about the centre
    # the bar's tilt: the top row of ink sits at most tan(15°) * 9.5 pixels off the centre column
    top = ink[:, 5].argmax(dim=1).float()
    assert ((top - 13.5).abs() <= math.tan(math.radians(15)) * 8.5 + 1).all()
    assert len(set(top.tolist())) > 3  # the angles differ from image to image


def test_rotations_come_from_the_seeded_generator_and_run_first():
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    torch.manual_seed(5)
    first = augment(images, 2, False, 0.0, 10)
    torch.manual_seed(5)
    assert torch.equal(first, augment(images, 2, False, 0.0, 10))
    torch.manual_seed(5)
    assert torch.equal(first, random_shift(random_rotate(images, 10), 2))
