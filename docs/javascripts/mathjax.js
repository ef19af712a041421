// MathJax configuration for pymdownx.arithmatex in generic mode, as mkdocs-material documents it:
// arithmatex wraps every formula in an element of class "arithmatex" with \( \) or \[ \]
// delimiters, so MathJax looks only inside those elements (code blocks that show backslashes are
// left alone). This file must load before tex-chtml.js.
//
// mkdocs-material's recipe also re-typesets on every `document$` emission, for its instant
// navigation. The site does not enable instant navigation (every page is a full load, which
// MathJax typesets by itself), and that hook must not be added without it: `document$` also
// fires for the first page, and clearing MathJax's font cache after the first typeset leaves
// every glyph blank.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};
