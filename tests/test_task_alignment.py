"""The translation tasks' paragraph pairs: a page whose paragraphs the language filter dropped at different places in
the two languages has as many paragraphs in both, but pairs by position only up to the first gap."""

from moelpr_lab.corpora.alignment_check import paragraph_ids
from moelpr_lab.corpora.tasks import aligned_paragraphs, split_shots

# One help page's source paragraphs in English and Spanish, in order.
PAGE = [
    ("Choose View - Toolbars - Drawing.", "Elija Ver - Barras de herramientas - Dibujo."),
    (
        "Inserts a rectangle at the cursor position of the current document.",
        "Inserta un rectángulo en la posición del cursor del documento actual.",
    ),
    ("Press Shift+F4 to select the first object.", "Pulse Mayús+F4 para seleccionar el primer objeto."),
    (
        "The new object is 2 cm wide and takes the line and fill settings of the default drawing style.",
        "El objeto nuevo mide 2 cm de ancho y toma la línea y el relleno del estilo de dibujo predeterminado.",
    ),
    (
        "Sets the fill options of the selected drawing object.",
        "Establece las opciones de relleno del objeto de dibujo seleccionado.",
    ),
    (
        "See the Drawing Functions page for 12 more shapes that you can insert in the same way.",
        "Consulte la página Funciones de dibujo para ver 12 formas más que puede insertar de la misma manera.",
    ),
]
ENGLISH = [english for english, _ in PAGE]
SPANISH = [spanish for _, spanish in PAGE]


def test_a_page_in_step_keeps_every_pair():
    pairs, dropped = aligned_paragraphs({"page.html": ENGLISH}, {"page.html": SPANISH})
    assert [(p["source"], p["target"]) for p in pairs] == PAGE and dropped == 0


def test_a_page_shifted_by_different_gaps_keeps_the_pairs_before_the_gap_only():
    # The filter dropped paragraph 2 in English and paragraph 5 in Spanish: five paragraphs each, by position the
    # last three are a paragraph's neighbour's translation, each of a plausible length.
    english = ENGLISH[:2] + ENGLISH[3:]
    spanish = SPANISH[:5]
    positional = list(zip(english, spanish))
    assert all(max(len(a), len(b)) <= 2.5 * min(len(a), len(b)) for a, b in positional)  # a length ratio passes them
    pairs, dropped = aligned_paragraphs({"page.html": english}, {"page.html": spanish})
    assert [(p["source"], p["target"]) for p in pairs] == PAGE[:2]
    assert [p["id"] for p in pairs] == ["page.html#0", "page.html#1"]
    assert dropped == 3


def test_the_prompts_examples_come_from_different_pages():
    pairs = [
        {"id": f"page{page}.html#{index}", "source": f"s{page}{index}", "target": f"t{page}{index}"}
        for page, count in ((0, 3), (1, 1), (2, 2), (3, 1))
        for index in range(count)
    ]
    shots, test = split_shots(pairs)
    assert [shot["id"] for shot in shots] == ["page0.html#0", "page1.html#0", "page2.html#0"]
    assert test == [pair for pair in pairs if pair not in shots]  # the rest in order, each scored once


def test_the_alignment_check_names_paragraphs_by_the_helps_ids():
    html = (
        '<html><body><h1 id="hd_id1">Drawing</h1><p id="par_id2" class="paragraph">Inserts a shape.</p>'
        '<div id="DisplayArea"><p>To access this command...</p><p>Choose Insert - Shape.</p></div></body></html>'
    )
    assert paragraph_ids(html) == {
        "Drawing": {"hd_id1"},
        "Inserts a shape.": {"par_id2"},
        "To access this command...": {"DisplayArea/1"},
        "Choose Insert - Shape.": {"DisplayArea/2"},
    }
