"""A small Chinese instruction set for the embedded default's SFT, generated here (no download).

`corpora/instructions_zh.json` is produced by `python -m corpora.instructions` (deterministic) and
shipped; HELDOUT are instructions of the same kinds whose answers are not in the file, used to print
a few generated answers at the end of `make sft`.
Tasks: addition/subtraction of small numbers, word translation, antonyms, character counts, copying,
reversing, and short lists.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

PATH = Path(__file__).resolve().parent / "instructions_zh.json"
HELDOUT_PATH = Path(__file__).resolve().parent / "instructions_zh_heldout.txt"

_NUM = "零一二三四五六七八九十"
_EN = {"猫": "cat", "书": "book", "水": "water", "火": "fire", "山": "mountain", "花": "flower", "鱼": "fish",
       "鸟": "bird", "树": "tree", "月亮": "moon", "太阳": "sun", "学校": "school", "老师": "teacher",
       "朋友": "friend", "苹果": "apple", "米饭": "rice", "电脑": "computer", "城市": "city", "音乐": "music",
       "天空": "sky", "汽车": "car", "房子": "house", "眼睛": "eye", "手": "hand", "红色": "red", "狗": "dog",
       "雨": "rain", "茶": "tea"}
_ANT = {"大": "小", "多": "少", "长": "短", "快": "慢", "冷": "热", "新": "旧", "好": "坏", "高": "低",
        "上": "下", "左": "右", "开": "关", "早": "晚", "黑": "白", "远": "近", "前": "后", "胖": "瘦"}
_LISTS = {"水果": ["苹果", "香蕉", "橙子", "葡萄", "西瓜"], "动物": ["猫", "狗", "兔子", "老虎", "大象"],
          "颜色": ["红色", "蓝色", "绿色", "黄色", "白色"], "蔬菜": ["白菜", "土豆", "萝卜", "番茄", "黄瓜"],
          "季节": ["春天", "夏天", "秋天", "冬天"], "交通工具": ["汽车", "火车", "飞机", "轮船", "自行车"]}
_PHRASES = ["今天天气很好", "我喜欢读书", "我们一起去公园", "学习使人进步", "春天来了", "谢谢你的帮助",
            "祝你生日快乐", "中国的首都是北京", "明天见", "这本书很有意思"]
_COUNT = {2: "两", 3: "三", 4: "四", 5: "五"}
# kept out of the shipped file: asked at the end of `make sft`
HELDOUT_WORDS = ("狗", "雨", "茶")
HELDOUT_ANT = ("高", "早")
HELDOUT = ["把“狗”翻译成英文。", "“高”的反义词是什么？", "计算 7 加 8 等于多少？", "列出三种蔬菜。",
           "重复这句话：我们明天去爬山"]


def generate(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for a in range(1, 10):
        for b in range(1, 10):
            if (a, b) in ((7, 8), (8, 7)):
                continue
            if rng.random() < 0.45:
                rows.append({"instruction": f"计算 {a} 加 {b} 等于多少？", "input": "", "output": f"{a} 加 {b} 等于 {a + b}。"})
            if a > b and rng.random() < 0.35:
                rows.append({"instruction": f"计算 {a} 减 {b} 等于多少？", "input": "", "output": f"{a} 减 {b} 等于 {a - b}。"})
    for zh, en in _EN.items():
        if zh in HELDOUT_WORDS:
            continue
        rows.append({"instruction": f"把“{zh}”翻译成英文。", "input": "", "output": f"“{zh}”的英文是 {en}。"})
        rows.append({"instruction": "把下面的词翻译成英文。", "input": zh, "output": en})
    for w, o in _ANT.items():
        if w in HELDOUT_ANT:
            continue
        rows.append({"instruction": f"“{w}”的反义词是什么？", "input": "", "output": f"“{w}”的反义词是“{o}”。"})
    for word in list(_EN) + list(_PHRASES):
        rows.append({"instruction": f"“{word}”有几个字？", "input": "", "output": f"“{word}”有{len(word)}个字。"})
    for p in _PHRASES:
        rows.append({"instruction": f"重复这句话：{p}", "input": "", "output": p})
        rows.append({"instruction": "把下面的句子倒过来写。", "input": p, "output": p[::-1]})
    for kind, items in _LISTS.items():
        for n in (2, 3, 4):
            if kind == "蔬菜" and n == 3:
                continue
            pick = rng.sample(items, min(n, len(items)))
            rows.append({"instruction": f"列出{_COUNT[n]}种{kind}。", "input": "",
                         "output": "\n".join(f"{i + 1}. {x}" for i, x in enumerate(pick))})
    rng.shuffle(rows)
    return rows


def sample_path() -> Path:
    if not PATH.is_file():
        write()
    return PATH


def write(path: Path = PATH) -> Path:
    path.write_text(json.dumps(generate(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    HELDOUT_PATH.write_text("\n".join(HELDOUT) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    p = write()
    print(f"wrote {len(json.loads(p.read_text(encoding='utf-8')))} records to {p}")
