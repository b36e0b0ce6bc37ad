"""data.text: image spans in text, and the box convention (docs/design.md "Box convention")."""

import pytest

from data.text import (
    denormalize_box,
    encode_text_with_images,
    format_box,
    normalize_box,
    normalize_coord,
    parse_boxes,
    validate_box,
)


def test_each_image_span_becomes_start_pads_end_and_paths_come_back_in_order(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, paths = encode_text_with_images(
        tok, "Picture 1: <img>a/x.png</img>\nPicture 2: <img>b.jpg</img> hi", 4
    )
    vocab = tok.get_vocab()
    s, e, p = vocab["<img>"], vocab["</img>"], vocab["<imgpad>"]
    assert paths == ["a/x.png", "b.jpg"]
    assert ids.count(s) == 2 and ids.count(e) == 2 and ids.count(p) == 8
    first = ids.index(s)
    assert ids[first : first + 6] == [s, p, p, p, p, e]
    assert tok.decode(ids[:first]) == "Picture 1: "
    # text between and after the spans is tokenised as usual
    assert tok.decode([t for t in ids if t not in (s, e, p)]) == "Picture 1: \nPicture 2:  hi"


def test_text_without_images_is_plain_tokenisation(tiny_tokenizer):
    ids, paths = encode_text_with_images(tiny_tokenizer, "a red circle", 4)
    assert paths == [] and ids == tiny_tokenizer("a red circle", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("look <img>a.png", "unclosed <img>"),
        ("<img>a.png<img>b.png</img></img>", "nested <img>"),
        ("a.png</img>", "</img> without <img>"),
        ("<img> </img>", "empty image path"),
    ],
)
def test_malformed_image_spans_raise(tiny_tokenizer, text, message):
    with pytest.raises(ValueError, match=message):
        encode_text_with_images(tiny_tokenizer, text, 4)


def test_pixel_coordinates_normalise_by_floor_x_1000_over_size_capped_at_999():
    assert normalize_coord(0, 640) == 0
    assert normalize_coord(320, 640) == 500
    assert normalize_coord(639.9, 640) == 999
    assert normalize_coord(640, 640) == 999  # the right/bottom edge stays inside [0, 1000)
    assert normalize_coord(1, 3) == 333  # floor, not round
    assert normalize_box((10, 20, 330, 470), 640, 480) == (15, 41, 515, 979)


def test_denormalise_uses_the_same_divisor_1000():
    assert denormalize_box((500, 250, 999, 0), 200, 100) == (100.0, 25.0, 199.8, 0.0)


def test_box_text_round_trips_and_validates():
    assert format_box((1, 2, 300, 400)) == "<box>(1,2),(300,400)</box>"
    assert parse_boxes("a <ref>dog</ref><box>(1,2),(300,400)</box> and <box>(0,0),(999,999)</box>") == [
        (1, 2, 300, 400),
        (0, 0, 999, 999),
    ]


@pytest.mark.parametrize("box", [(0, 0, 1000, 10), (-1, 0, 5, 5), (10, 10, 5, 20), (0.5, 0, 1, 1)])
def test_boxes_outside_0_1000_or_out_of_order_are_rejected(box):
    with pytest.raises(ValueError):
        validate_box(list(box))


def test_out_of_range_or_malformed_box_in_text_is_rejected():
    with pytest.raises(ValueError, match="outside"):
        parse_boxes("<box>(0,0),(1000,5)</box>")
    with pytest.raises(ValueError, match="malformed box"):
        parse_boxes("<box>(0,0)</box>")


def test_grounding_tags_pair_up_and_a_prompt_may_end_with_an_open_box():
    from data.text import BoxError, GroundingTagError, check_grounding_tags

    check_grounding_tags(
        "<ref>a dog</ref><box>(1,2),(300,400)</box> and <ref>t</ref><quad>(1,2),(3,4),(5,6),(7,8)</quad>"
    )
    check_grounding_tags(
        "<img>p.png</img><ref>the dog</ref><box>", open_box_at_end=True
    )  # the grounding prompt
    for text, error in [
        ("<ref>the dog</ref><box>", GroundingTagError),  # not a prompt: the open box is unclosed
        ("<ref>the dog<box>(1,2),(3,4)</box>", GroundingTagError),  # box inside an open ref
        ("a dog</ref>", GroundingTagError),  # stray closing tag
        ("<box>(1,2),(3,4)</box></box>", GroundingTagError),
        ("<ref>dog</ref><box>(1,2),(3,4)</box> more <ref>cat", GroundingTagError),
        ("<box>(1,2),(1000,4)</box>", BoxError),
        ("<quad>(1,2),(3,4),(5,6)</quad>", BoxError),  # three points
        ("<quad>(1,2),(3,4),(5,6),(7,1000)</quad>", BoxError),
    ]:
        with pytest.raises(error):
            check_grounding_tags(text, open_box_at_end=False)
    with pytest.raises(GroundingTagError):  # an open box followed by more text is no prompt ending
        check_grounding_tags("<ref>dog</ref><box> and then", open_box_at_end=True)
