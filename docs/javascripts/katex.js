// KaTeX, served from this site (docs/assets/katex/, no network): renders the maths that
// pymdownx.arithmatex (generic mode) leaves as \( ... \) and \[ ... \] in the pages.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
});
