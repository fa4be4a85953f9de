"""Generate Flotilla's small deterministic test models, their tokenizer and the test fixtures.

Usage:
    python3 models/generate.py            # (re)write every generated file under models/
    python3 models/generate.py --check    # regenerate into a temporary folder and fail
                                          # unless the files under models/ are identical

Everything is derived from fixed seeds and written in a fixed order, so two runs give
byte-identical files; only the onnxruntime outputs in the fixtures may differ in their last
bits between CPUs, and --check compares those within a tolerance. See models/README.md for
what each model is for.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The path insert above makes the sibling modules importable.
import bert_onnx  # noqa: E402
from bert_onnx import BertConfig, BertSizes  # noqa: E402
from bundle_files import (  # noqa: E402
    DEFAULT_REQUIREMENTS,
    encode_batch,
    mean_pool_normalized,
    softmax,
    tensor,
    write_bundle_toml,
    write_json,
)

MODELS_DIR = Path(__file__).resolve().parent

# Every generated file must stay well under this, so the repository stays small.
MAX_FILE_BYTES = 1_000_000

# ---------------------------------------------------------------------------
# Vocabulary

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

ASCII_LETTERS = "abcdefghijklmnopqrstuvwxyz"
ASCII_DIGITS = "0123456789"
ASCII_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"

# Common English words. The normalizer lowercases and strips accents, so only
# lowercase, accent-free forms are needed.
ENGLISH_WORDS = """
the of and to a in is it you that he was for on are with as i his they be at one have
this from or had by hot but some what there we can out other were all your when up use
word how said an each she which do their time if will way about many then them would
write like so these her long make thing see him two has look more day could go come did
my sound no most number who over know water than call first people may down side been now
find any new work part take get place made live where after back little only round man
year came show every good me give our under name very through just form much great think
say help low line before turn cause same mean differ move right boy old too does tell
sentence set three want air well also play small end put home read hand port large spell
add even land here must big high such follow act why ask men change went light kind off
need house picture try us again animal point mother near build self earth father head stand
own page should country found answer school grow study still learn plant cover food sun four
thought let keep eye never last door between city tree cross since hard start might story
saw far sea draw left late run while press close night real life few stop open seem together
next white children begin got walk example ease paper often always music those both mark book
letter until mile river car feet care second group carry took rain eat room friend began idea
fish mountain north once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose
leave song measure state product black short numeral class wind question happen complete ship
area half rock order fire south problem piece told knew pass farm top whole king size heard
best hour better true during hundred am remember step early hold west ground interest reach
fast five sing listen six table travel less morning ten simple several vowel toward war lay
against pattern slow center love person money serve appear road map science rule govern pull
cold notice voice fall power town fine certain fly unit lead cry dark machine note wait plan
figure star box noun field rest correct able pound done beauty drive stood contain front teach
week final gave green oh quick develop sleep warm free minute strong special mind behind clear
tail produce fact street inch lot nothing course stay wheel full force blue object decide
surface deep moon island foot yet busy test record boat common gold possible plane age dry
wonder laugh thousand ago ran check game shape yes cool miss brought heat snow bed bring sit
perhaps fill east weight language among hello world learning model models data computer
network neural text token language english chinese japanese today weather nice bad terrible
awful happy sad guitar instrument playing plays someone stock market fell cafe coffee tea
pizza quick brown fox jumps lazy agent edge bundle signed test tests testing deja vu naive
""".split()

# Suffix pieces, so out-of-vocabulary English words split into readable parts.
ENGLISH_SUFFIXES = [
    "##es",
    "##ed",
    "##ing",
    "##ly",
    "##er",
    "##ers",
    "##est",
    "##tion",
    "##ness",
    "##able",
    "##ment",
    "##ful",
    "##less",
    "##ize",
    "##al",
    "##ity",
]

# Four hundred of the most frequent Chinese characters, no repeats.
CHINESE_CHARACTERS = (
    "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生"
    "自会那后能对着事其里所去行过家十用发天如然作方成者多日都三小军二无同么经法当起与"
    "好看学进种将还分此心前面又定见只主没公从知使两已间外想头本部等新东老问现回相高美"
    "手实点动很女气最样正长身物理文力明意合重四开全表总机情边向加变今话工走西给它因果"
    "五百体由千万月白比爱友书车路电水火山风雨花草木林金土石田口目耳足脸声音色光影星云"
    "海河湖江岛城市村街店门窗房屋楼桥校院医病药饭菜茶酒肉鱼鸡鸭米包糖盐油钱买卖送借找"
    "读写听唱跳跑飞坐站睡吃喝穿洗做玩笑哭爸妈哥姐弟妹儿孙朋客师习教课题考试字词句语言"
    "汉英德俄韩识科技术网络脑计算器智系统数据模型答案早晚午夜春夏秋冬周期昨钟秒号红黄"
    "蓝绿黑少短低快慢远近旧坏冷热难易错真假左右南北请谢再您她吗呢吧啊哦嗯太非常才更较"
    "必须应该喜欢希望觉认记忆忘始结束息活展济政治历史化艺乐育运健康安环境界京园散步世"
)

# Kana are not split out one by one like CJK ideographs, so a kana word is matched as a
# first piece plus "##" continuations: each kana appears in both forms.
HIRAGANA = (
    "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
    "がぎぐげござじずぜぞだでどばびぶべぼぱっゃゅょ"
)
KATAKANA = (
    "アイウエオカキクケコサシスセソタチツテトナニヌネノハヒフヘホマミムメモヤユヨラリルレロワヲンー"
)


def build_vocab() -> list[str]:
    """The tiny vocabulary, in id order; raises if any entry repeats."""
    singles = list(ASCII_LETTERS + ASCII_DIGITS + ASCII_PUNCTUATION)
    kana = list(HIRAGANA + KATAKANA)
    vocab = (
        SPECIAL_TOKENS
        + singles
        + [f"##{c}" for c in singles]
        + ENGLISH_SUFFIXES
        + [w for w in dict.fromkeys(ENGLISH_WORDS) if w not in singles]
        + list(CHINESE_CHARACTERS)
        + kana
        + [f"##{c}" for c in kana]
    )
    repeated = sorted({t for t in vocab if vocab.count(t) > 1})
    if repeated:
        raise ValueError(f"vocabulary repeats tokens: {' '.join(repeated)}")
    return vocab


def build_tokenizer(vocab: list[str]) -> Tokenizer:
    """A BERT-style WordPiece tokenizer; truncation and padding are left to the agent."""
    ids = {token: i for i, token in enumerate(vocab)}
    tokenizer = Tokenizer(
        WordPiece(
            ids, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100
        )
    )
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


# ---------------------------------------------------------------------------
# Weights

TINY_CONFIG = BertConfig(hidden=32, heads=2, layers=2, eps=1e-12)
# Same width, 24 times the depth, with two distinct layers repeated (shared weights keep the
# file small): a correct model that is many times slower to run.
DEEP_CONFIG = BertConfig(hidden=32, heads=2, layers=48, eps=1e-12)
DEEP_DISTINCT_LAYERS = 2
TINY_INTERMEDIATE = 64
TINY_MAX_POSITIONS = 128
LABELS = ["negative", "neutral", "positive"]

ENCODER_SEED = 20240101
HEAD_SEED = 20240102
PERTURB_SEED = 20240103
MLP_SEED = 20240104
DEEP_SEED = 20240105


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """BERT-like initialisation, scaled up so that different inputs give clearly different outputs."""
    if name.endswith("LayerNorm.weight"):
        values = 1.0 + rng.normal(0.0, 0.1, shape)
    elif name.endswith(".bias"):
        values = rng.normal(0.0, 0.1, shape)
    elif "embeddings" in name:
        values = rng.normal(0.0, 1.0, shape)
    else:
        fan_in = shape[-1]
        values = rng.normal(0.0, 1.0 / math.sqrt(fan_in), shape)
    return values.astype(np.float32)


def tiny_weights(vocab_size: int, config: BertConfig, seed: int) -> dict[str, np.ndarray]:
    sizes = BertSizes(
        vocab=vocab_size,
        max_positions=TINY_MAX_POSITIONS,
        type_vocab=2,
        intermediate=TINY_INTERMEDIATE,
    )
    rng = np.random.default_rng(seed)
    return {
        name: random_tensor(rng, name, shape)
        for name, shape in bert_onnx.weight_shapes(config, sizes).items()
    }


def shared_layer_weights(
    vocab_size: int, config: BertConfig, distinct: int, seed: int
) -> dict[str, np.ndarray]:
    """Seeded weights whose encoder layer i repeats layer i % distinct."""
    weights = tiny_weights(vocab_size, config, seed)
    prefix = "encoder.layer."
    for name in list(weights):
        if name.startswith(prefix):
            index, rest = name[len(prefix) :].split(".", 1)
            weights[name] = weights[f"{prefix}{int(index) % distinct}.{rest}"]
    return weights


def classifier_weights(encoder: dict[str, np.ndarray], config: BertConfig) -> dict[str, np.ndarray]:
    """The encoder's weights plus a seeded pooler and classifier head."""
    rng = np.random.default_rng(HEAD_SEED)
    head = {
        "pooler.dense.weight": (config.hidden, config.hidden),
        "pooler.dense.bias": (config.hidden,),
        "classifier.weight": (config.num_labels, config.hidden),
        "classifier.bias": (config.num_labels,),
    }
    weights = dict(encoder)
    for name, shape in head.items():
        weights[name] = random_tensor(rng, name, shape)
    return weights


def perturbed_weights(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Same names and shapes, every tensor shifted by seeded noise of its own scale."""
    rng = np.random.default_rng(PERTURB_SEED)
    out = {}
    for name, array in weights.items():
        scale = float(np.std(array)) or 0.1
        out[name] = (array + rng.normal(0.0, scale, array.shape)).astype(np.float32)
    return out


# ---------------------------------------------------------------------------
# The raw MLP and the broken model

MLP_SHAPES = {
    "dense1.weight": (4, 8),
    "dense1.bias": (8,),
    "dense2.weight": (8, 3),
    "dense2.bias": (3,),
}


def mlp_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(MLP_SEED)
    return {
        name: rng.normal(0.0, 0.1 if name.endswith("bias") else 0.7, shape).astype(np.float32)
        for name, shape in MLP_SHAPES.items()
    }


def mlp_reference(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    hidden = np.maximum(x.astype(np.float64) @ w["dense1.weight"] + w["dense1.bias"], 0.0)
    return hidden @ w["dense2.weight"] + w["dense2.bias"]


def _mlp_io() -> tuple[list, list]:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])]
    return inputs, outputs


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", bert_onnx.OPSET)],
        producer_name=bert_onnx.PRODUCER,
        ir_version=bert_onnx.IR_VERSION,
    )


def build_mlp(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x [batch, 4] -> dense(8) -> Relu -> dense(3) -> y [batch, 3]."""
    nodes = [
        helper.make_node("MatMul", ["x", "dense1.weight"], ["dense1/matmul"], name="dense1/MatMul"),
        helper.make_node(
            "Add", ["dense1/matmul", "dense1.bias"], ["dense1/out"], name="dense1/Add"
        ),
        helper.make_node("Relu", ["dense1/out"], ["relu/out"], name="relu"),
        helper.make_node(
            "MatMul", ["relu/out", "dense2.weight"], ["dense2/matmul"], name="dense2/MatMul"
        ),
        helper.make_node("Add", ["dense2/matmul", "dense2.bias"], ["y"], name="dense2/Add"),
    ]
    initializers = [numpy_helper.from_array(weights[name], name) for name in MLP_SHAPES]
    inputs, outputs = _mlp_io()
    model = _model(
        helper.make_graph(nodes, "tiny-mlp-raw", inputs, outputs, initializer=initializers)
    )
    onnx.checker.check_model(model, full_check=True)
    return model


BROKEN_OP = "FlotillaNoSuchOp"


def build_broken(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The MLP's graph with its Relu replaced by an operator no engine implements.

    The protobuf parses and its graph inputs/outputs are readable, but creating an
    inference session fails. Deliberately not run through the ONNX checker.
    """
    model = build_mlp(weights)
    model.graph.name = "broken-load"
    (relu,) = [node for node in model.graph.node if node.op_type == "Relu"]
    relu.op_type = BROKEN_OP
    relu.name = "no-such-op"
    return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return bert_onnx.run_onnxruntime(model, feeds)


def save_onnx(path: Path, model: onnx.ModelProto) -> None:
    path.write_bytes(model.SerializeToString())


def encode(
    tokenizer: Tokenizer, texts: list[str], pair: list[str] | None = None
) -> dict[str, np.ndarray]:
    return encode_batch(tokenizer, texts, TINY_MAX_POSITIONS, pair)


def write_bundle(path: Path, bundle: dict, comment: str) -> None:
    write_bundle_toml(path, bundle, comment, generator="models/generate.py")


# ---------------------------------------------------------------------------
# Bundles

SELF_TEST_TOLERANCE = 0.0001

EMBED_SELF_TEST_TEXTS = ["hello world", "今天天气很好"]
MIXED_SELF_TEST_TEXTS = ["我爱 machine learning!", "The quick brown fox jumps over the lazy dog."]
CLASSIFY_SELF_TEST_TEXTS = ["I love this, it is great!", "this is terrible", "今天天气很好"]


def text_section(output: str, embedding: bool) -> dict:
    section = {
        "tokenizer": "tokenizer.json",
        "max_sequence_length": TINY_MAX_POSITIONS,
        "truncation": "truncate",
    }
    if embedding:
        section |= {"pooling": "mean", "normalize": True}
    else:
        # The classifier's logits are already one vector per text.
        section |= {"pooling": "none", "normalize": False}
    section["output"] = output
    return section


def embedding_bundle(name: str, self_tests: list[dict]) -> dict:
    return {
        "name": name,
        "version": "1.0.0",
        "sequence": 1,
        "valid_days": 365,
        "model": {
            "entry": "model.onnx",
            "task": "embedding",
            "text": text_section("last_hidden_state", True),
        },
        "requirements": DEFAULT_REQUIREMENTS,
        "self_test": self_tests,
    }


# ---------------------------------------------------------------------------
# Fixtures

TOKENIZATION_TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "HELLO World, How ARE you?",
    "Café déjà vu, naïve façade",
    "今天天气很好",
    "我爱 machine learning!",
    "中文English混合123",
    "こんにちは、世界",
    "東京タワーに行きました",
    "안녕하세요",
    "I love pizza 🍕😀",
    "Call 555-0199 or pay $3.50 (50% off)!",
    "unbelievably antidisestablishmentarianism straße",
    "  leading   and trailing\twhitespace\n\nnewlines  ",
    "zero\u200bwidth and control\u0007chars",
    "x" * 101,
    "",
]


def tokenization_fixture(tokenizer: Tokenizer) -> list[dict]:
    cases = []
    for text in TOKENIZATION_TEXTS:
        encoding = tokenizer.encode(text)
        cases.append(
            {
                "text": text,
                "ids": encoding.ids,
                "type_ids": encoding.type_ids,
                "tokens": encoding.tokens,
                "attention_mask": encoding.attention_mask,
            }
        )
    return cases


def text_case(
    name: str,
    tokenizer: Tokenizer,
    model: onnx.ModelProto,
    texts: list[str],
    pair: list[str] | None,
    post,
) -> dict:
    """One reference case for a text model: inputs, the raw output, and the post-processed tensor."""
    feeds = encode(tokenizer, texts, pair)
    output_name = model.graph.output[0].name
    output = run(model, feeds)
    case = {"name": name, "texts": texts}
    if pair is not None:
        case["pair_texts"] = pair
    case["inputs"] = [tensor(k, v) for k, v in feeds.items()]
    case["outputs"] = [tensor(output_name, output)]
    post_name, post_fn = post
    case["postprocessed"] = tensor(post_name, post_fn(output, feeds).astype(np.float32))
    return case


# ---------------------------------------------------------------------------
# Checks


def check_tiny_bert(
    model: onnx.ModelProto, weights: dict, config: BertConfig, tokenizer: Tokenizer
) -> None:
    feeds = encode(tokenizer, ["hello world", "我爱 machine learning! 今天天气很好"])
    diff = bert_onnx.verify_against_reference(model, weights, config, feeds, atol=1e-4)
    print(f"  onnxruntime vs numpy reference: max abs diff {diff:.2e}")


def check_mlp(model: onnx.ModelProto, weights: dict) -> None:
    x = np.random.default_rng(7).normal(size=(5, 4)).astype(np.float32)
    diff = float(np.max(np.abs(run(model, {"x": x}) - mlp_reference(weights, x))))
    if not diff <= 1e-5:
        raise AssertionError(f"tiny-mlp-raw differs from the numpy reference by {diff:.3g}")
    print(f"  onnxruntime vs numpy reference: max abs diff {diff:.2e}")


def check_broken(path: Path) -> None:
    model = onnx.load(str(path))
    names = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    try:
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        first_line = str(error).splitlines()[0][:120]
        print(f"  graph io {names} readable; onnxruntime refuses it as intended: {first_line}")
        return
    raise AssertionError(f"{path}: onnxruntime loaded the broken model")


# ---------------------------------------------------------------------------


def generate(root: Path) -> list[Path]:
    """Write every generated file under `root` (laid out like models/); return them in order."""
    written: list[Path] = []

    def out(relative: str) -> Path:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        written.append(path)
        return path

    vocab = build_vocab()
    tokenizer = build_tokenizer(vocab)
    tokenizer_json = tokenizer.to_str(pretty=True) + "\n"
    print(f"tokenizer: {len(vocab)} tokens")

    # tiny-bert-embed
    encoder = tiny_weights(len(vocab), TINY_CONFIG, ENCODER_SEED)
    embed_model = bert_onnx.build_bert_model(encoder, TINY_CONFIG, "tiny-bert-embed")
    print("tiny-bert-embed")
    check_tiny_bert(embed_model, encoder, TINY_CONFIG, tokenizer)
    save_onnx(out("tiny-bert-embed/model.onnx"), embed_model)
    out("tiny-bert-embed/tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    write_bundle(
        out("tiny-bert-embed/bundle.toml"),
        embedding_bundle(
            "tiny-bert-embed",
            [
                {
                    "name": "english-and-chinese",
                    "texts": EMBED_SELF_TEST_TEXTS,
                    "tolerance": SELF_TEST_TOLERANCE,
                },
                {
                    "name": "mixed-script",
                    "texts": MIXED_SELF_TEST_TEXTS,
                    "tolerance": SELF_TEST_TOLERANCE,
                },
            ],
        ),
        "Tiny seeded 2-layer BERT encoder (hidden 32) for sentence embeddings.\n"
        "Self-test expectations are left out: the packer computes them.",
    )

    # tiny-bert-embed-deep
    deep = shared_layer_weights(len(vocab), DEEP_CONFIG, DEEP_DISTINCT_LAYERS, DEEP_SEED)
    deep_model = bert_onnx.build_bert_model(
        deep, DEEP_CONFIG, "tiny-bert-embed-deep", share_identical=True
    )
    print("tiny-bert-embed-deep")
    check_tiny_bert(deep_model, deep, DEEP_CONFIG, tokenizer)
    save_onnx(out("tiny-bert-embed-deep/model.onnx"), deep_model)
    out("tiny-bert-embed-deep/tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    write_bundle(
        out("tiny-bert-embed-deep/bundle.toml"),
        embedding_bundle(
            "tiny-bert-embed-deep",
            [
                {
                    "name": "english-and-chinese",
                    "texts": EMBED_SELF_TEST_TEXTS,
                    "tolerance": SELF_TEST_TOLERANCE,
                },
            ],
        ),
        "Seeded 48-layer BERT encoder (hidden 32; two distinct layers, repeated): correct,\n"
        "passes its self-test, and runs many times slower than tiny-bert-embed.",
    )

    # tiny-bert-classify
    classify_config = BertConfig(hidden=32, heads=2, layers=2, eps=1e-12, num_labels=len(LABELS))
    classify = classifier_weights(encoder, classify_config)
    classify_model = bert_onnx.build_bert_model(classify, classify_config, "tiny-bert-classify")
    print("tiny-bert-classify")
    check_tiny_bert(classify_model, classify, classify_config, tokenizer)
    save_onnx(out("tiny-bert-classify/model.onnx"), classify_model)
    out("tiny-bert-classify/tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    write_bundle(
        out("tiny-bert-classify/bundle.toml"),
        {
            "name": "tiny-bert-classify",
            "version": "1.0.0",
            "sequence": 1,
            "model": {
                "entry": "model.onnx",
                "task": "classification",
                "labels": LABELS,
                "text": text_section("logits", False),
            },
            "requirements": DEFAULT_REQUIREMENTS,
            "self_test": [
                {
                    "name": "sentiment",
                    "texts": CLASSIFY_SELF_TEST_TEXTS,
                    "tolerance": SELF_TEST_TOLERANCE,
                },
            ],
        },
        "tiny-bert-embed's encoder plus a seeded pooler and 3-label classifier head.\n"
        "The labels are names only: the head is random, not trained.",
    )

    # tiny-bert-selftest-fail: expected values from tiny-bert-embed, weights perturbed.
    fail_weights = perturbed_weights(encoder)
    fail_model = bert_onnx.build_bert_model(fail_weights, TINY_CONFIG, "tiny-bert-selftest-fail")
    print("tiny-bert-selftest-fail")
    check_tiny_bert(fail_model, fail_weights, TINY_CONFIG, tokenizer)
    feeds = encode(tokenizer, EMBED_SELF_TEST_TEXTS)
    expected = mean_pool_normalized(run(embed_model, feeds), feeds["attention_mask"]).astype(
        np.float32
    )
    actual = mean_pool_normalized(run(fail_model, feeds), feeds["attention_mask"])
    gap = float(np.max(np.abs(actual - expected)))
    if not gap > 100 * SELF_TEST_TOLERANCE:
        raise AssertionError(f"perturbed model is too close to its expected embeddings: {gap:.3g}")
    print(
        f"  expected vs actual embeddings: max abs diff {gap:.3f} (tolerance {SELF_TEST_TOLERANCE})"
    )
    save_onnx(out("tiny-bert-selftest-fail/model.onnx"), fail_model)
    out("tiny-bert-selftest-fail/tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    write_bundle(
        out("tiny-bert-selftest-fail/bundle.toml"),
        embedding_bundle(
            "tiny-bert-selftest-fail",
            [
                {
                    "name": "english-and-chinese",
                    "texts": EMBED_SELF_TEST_TEXTS,
                    "tolerance": SELF_TEST_TOLERANCE,
                    "expected": [tensor("embeddings", expected)],
                }
            ],
        ),
        "Loads and runs, but fails its self-test on purpose: the expected embeddings are\n"
        "tiny-bert-embed's, while this model's weights are perturbed copies of them.",
    )

    # tiny-mlp-raw
    mlp = mlp_weights()
    mlp_model = build_mlp(mlp)
    print("tiny-mlp-raw")
    check_mlp(mlp_model, mlp)
    save_onnx(out("tiny-mlp-raw/model.onnx"), mlp_model)
    mlp_io = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": ["batch", 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": ["batch", 3]}],
    }
    write_bundle(
        out("tiny-mlp-raw/bundle.toml"),
        {
            "name": "tiny-mlp-raw",
            "version": "1.0.0",
            "sequence": 1,
            "model": {"entry": "model.onnx", "task": "raw"},
            "requirements": DEFAULT_REQUIREMENTS,
            "self_test": [
                {
                    "name": "ones",
                    "tolerance": 0.00001,
                    "inputs": [tensor("x", np.ones((1, 4), np.float32))],
                },
                {
                    "name": "batch-of-two",
                    "tolerance": 0.00001,
                    "inputs": [
                        tensor(
                            "x",
                            np.array([[0.5, -1.0, 2.0, 0.0], [-0.25, 0.75, -1.5, 3.0]], np.float32),
                        )
                    ],
                },
            ],
        },
        "Seeded two-layer MLP, x FP32 [batch, 4] -> Relu -> y FP32 [batch, 3].\n"
        "Inputs and outputs are read from the ONNX graph.",
    )

    # broken-load
    broken_path = out("broken-load/model.onnx")
    save_onnx(broken_path, build_broken(mlp))
    print("broken-load")
    check_broken(broken_path)
    write_bundle(
        out("broken-load/bundle.toml"),
        {
            "name": "broken-load",
            "version": "1.0.0",
            "sequence": 1,
            "model": {"entry": "model.onnx", "task": "raw"} | mlp_io,
            "requirements": DEFAULT_REQUIREMENTS,
            "self_test": [
                {
                    "name": "ones",
                    "tolerance": 0.00001,
                    "inputs": [tensor("x", np.ones((1, 4), np.float32))],
                    "expected": [tensor("y", np.zeros((1, 3), np.float32))],
                }
            ],
        },
        f"Parses as ONNX, but uses the nonexistent operator {BROKEN_OP}, so no engine loads it.\n"
        "Inputs, outputs and self-test expectations are explicit so packing never runs it.",
    )

    # fixtures
    write_json(out("fixtures/tokenization.json"), tokenization_fixture(tokenizer))

    embeddings = (
        "embeddings",
        lambda hidden, feeds: mean_pool_normalized(hidden, feeds["attention_mask"]),
    )
    probabilities = ("probabilities", lambda logits, feeds: softmax(logits))
    mlp_inputs = {
        "ones": np.ones((1, 4), np.float32),
        "batch-of-three": np.random.default_rng(11).normal(size=(3, 4)).astype(np.float32),
    }
    reference = {
        "description": "onnxruntime outputs of the tiny models, written by models/generate.py",
        "onnxruntime_version": onnxruntime.__version__,
        "models": {
            "tiny-bert-embed": [
                text_case("single", tokenizer, embed_model, ["hello world"], None, embeddings),
                text_case(
                    "padded-batch",
                    tokenizer,
                    embed_model,
                    ["hello world", "今天天气很好，我们去公园散步吧"],
                    None,
                    embeddings,
                ),
                text_case(
                    "sentence-pair",
                    tokenizer,
                    embed_model,
                    ["what is this?"],
                    ["a test"],
                    embeddings,
                ),
            ],
            "tiny-bert-classify": [
                text_case(
                    "single",
                    tokenizer,
                    classify_model,
                    ["I love this, it is great!"],
                    None,
                    probabilities,
                ),
                text_case(
                    "padded-batch",
                    tokenizer,
                    classify_model,
                    ["this is terrible", "我爱 machine learning! 今天天气很好"],
                    None,
                    probabilities,
                ),
            ],
            "tiny-mlp-raw": [
                {
                    "name": name,
                    "inputs": [tensor("x", x)],
                    "outputs": [tensor("y", run(mlp_model, {"x": x}))],
                }
                for name, x in mlp_inputs.items()
            ],
        },
    }
    write_json(out("fixtures/reference_outputs.json"), reference)
    return written


def check_sizes(paths: list[Path]) -> None:
    for path in paths:
        size = path.stat().st_size
        if size >= MAX_FILE_BYTES:
            raise AssertionError(f"{path} is {size} bytes, over the {MAX_FILE_BYTES}-byte limit")


# onnxruntime picks its CPU kernels by instruction set, so its outputs differ in the last
# bits from one CPU to another; the fixture holding them is compared within this bound
# (far below the 1e-4 the Rust tests allow). Every other file must be byte-identical.
RUNTIME_OUTPUTS = Path("fixtures/reference_outputs.json")
RUNTIME_OUTPUT_TOLERANCE = 1e-5


def matches_committed(generated: Path, committed: Path) -> bool:
    if not committed.is_file():
        return False
    if filecmp.cmp(generated, committed, shallow=False):
        return True
    if committed.relative_to(MODELS_DIR) != RUNTIME_OUTPUTS:
        return False
    ours, theirs = (json.loads(path.read_text()) for path in (generated, committed))
    return same_within(ours, theirs, RUNTIME_OUTPUT_TOLERANCE)


def same_within(a: object, b: object, tolerance: float) -> bool:
    """Whether two JSON values are equal, floats within `tolerance` of each other."""
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return abs(a - b) <= tolerance
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_within(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_within(x, y, tolerance) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary folder and fail unless models/ holds identical files",
    )
    args = parser.parse_args()

    if not args.check:
        written = generate(MODELS_DIR)
        check_sizes(written)
        for path in written:
            print(f"wrote {path.relative_to(MODELS_DIR)} ({path.stat().st_size} bytes)")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        written = generate(Path(tmp))
        check_sizes(written)
        stale = [
            path.relative_to(tmp)
            for path in written
            if not matches_committed(path, MODELS_DIR / path.relative_to(tmp))
        ]
    if stale:
        print(
            "generated files differ from the committed ones: " + ", ".join(map(str, stale)),
            file=sys.stderr,
        )
        return 1
    print(f"all {len(written)} generated files match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
