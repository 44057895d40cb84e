"""A tiny LLaVA processor built locally (no hub): a word-level tokenizer whose ids match
tiny-llava's vocabulary (320 ids, ``<image>`` = 300), a CLIP image processor at 56 px, and
a chat template."""
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def tiny_llava_processor():
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:   # older transformers
        from transformers import CLIPImageProcessor as ImageProcessor
    vocab = {f"t{i}": i for i in range(6, 320) if i != 300}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "user:": 4, "assistant:": 5, "<image>": 300})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.padding_side = "left"
    ip = ImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
