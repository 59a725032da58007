"""Fixed probe texts for tokenizer parity and English-identity checks: Chinese, English, mixed, whitespace-heavy."""
from __future__ import annotations

import random

TABLE1 = "人工智能是计算机科学、心理学、哲学等学科融合的交叉学科。"

CHINESE = [
    TABLE1,
    "中华人民共和国国务院今天发布了关于进一步优化营商环境的意见。",
    "我们去意大利旅游的时候，参观了很多博物馆和古老的教堂。",
    "北京时间2023年3月15日，全国人民代表大会第十四届一次会议在人民大会堂闭幕。",
    "这家酒店的服务态度非常好，房间干净整洁，早餐种类丰富，下次还会再来！",
    "《红楼梦》是中国古典四大名著之一，作者曹雪芹。",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "请问从上海虹桥站到浦东国际机场怎么走？大约需要多长时间？",
    "深度学习模型在自然语言处理任务上取得了显著进展，例如机器翻译、文本摘要和问答系统。",
    "１９９８年１月１日，新华社记者报道：全国各地群众欢度元旦。",
    "他说：“我们一定要把这件事情做好。”大家纷纷点头表示同意……",
    "菜品味道一般，送餐速度太慢了，等了一个多小时，差评。",
    "量子计算利用量子叠加和纠缠原理，有望在密码学、材料科学等领域带来突破。",
    "長江是中國第一大河，全長約六千三百公里。",
    "今天天气真好😊，我们一起去公园散步吧~",
]

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1998, the company reported revenues of $16.5 billion, up 12% from the previous year.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Please eat your vegetables; the geothermal energy stream was unexpectedly strong.",
    "Version 1.2.3-beta (build #4567) was released on 2023-03-15T10:30:00Z.",
    "She said, \"I'll be there at 5 p.m.\" -- but she never came.",
    "E = mc^2, where c ≈ 3.0 × 10^8 m/s.",
    "Naïve café owners in São Paulo serve crème brûlée.",
    "https://example.com/path?query=value&other=42#anchor",
    "I. Introduction\nII. Methods\nIII. Results",
]

MIXED = [
    "我在用Python 3.11写一个transformers的LoRA训练脚本。",
    "iPhone 15 Pro的价格是7999元，比去年贵了1000元。",
    "GPT-4 在 C-Eval 上的得分是 68.7 分。",
    "LLaMA模型的词表只有32000个token，中文字符大多被拆成字节。",
    "请把下面的句子翻译成英文：The weather is nice today.",
    "COVID-19疫情期间，WHO发布了多项指南。",
]


def whitespace_probes(n: int = 200, seed: int = 0) -> list[str]:
    """Leading, trailing and repeated spaces, tabs and newlines around Latin and CJK text."""
    rng = random.Random(seed)
    atoms = ["a", "hello", "中", "中国", "x1", "def", "。", "，", "the", "人工智能", "9", "▁", "\t", "\n", "  ", " "]
    out = [" ", "  ", " " * 17, " " * 40, "\n", "\t", "a  b", "  hello", " 中国 ", "x" + " " * 17 + "y",
           " " * 20 + "def f():", "中 文  混合   text", "  中国", "▁▁a", "  ▁ a", "a\u3000b"]
    for _ in range(n):
        k = rng.randint(1, 8)
        s = ""
        for _ in range(k):
            s += " " * rng.choice([0, 0, 1, 2, 3, 5, 8, 16, 17, 33]) + rng.choice(atoms)
        s += " " * rng.choice([0, 0, 1, 2, 7])
        out.append(s)
    return out


def probe_set() -> dict[str, list[str]]:
    return {"chinese": CHINESE, "english": ENGLISH, "mixed": MIXED, "whitespace": whitespace_probes()}
