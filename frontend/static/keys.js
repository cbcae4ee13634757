// Keyboard navigation and labelling for going through many features: ← and → follow the page's
// rel="prev" and rel="next" links (the feature page, the list's pager), "r" the random-feature link,
// "n" the next feature to label in the random sample, "g" focuses the header's box that goes to a
// feature by its number; 1-4 choose the label editor's category (in its order: semantic, visual
// pattern, noise, unclear) and put the caret in its text, where Ctrl+Enter (⌘+Enter) saves. Other
// keys typed into a form field, or held with a modifier, are left alone.
document.addEventListener("keydown", function (event) {
  var target = event.target;
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && target.form && target.form.classList.contains("label-form")) {
    event.preventDefault();
    target.form.requestSubmit();  // a submit event, which htmx (or the browser) handles as a click on Save would be
    return;
  }
  if (event.defaultPrevented || event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
  if (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT|BUTTON)$/.test(target.tagName)) return;
  var category = document.querySelector("form.label-form select[name=category]");
  if (category && /^[1-9]$/.test(event.key) && +event.key < category.options.length) {
    event.preventDefault();
    category.selectedIndex = +event.key;  // option 0 is "choose…"
    category.form.querySelector("textarea[name=text]").focus();
    return;
  }
  var box = event.key === "g" && document.querySelector('input[data-key="g"]');
  if (box) {
    event.preventDefault();  // the "g" is not typed into the box
    box.focus();
    box.select();
    return;
  }
  var selector = { ArrowLeft: 'a[rel="prev"]', ArrowRight: 'a[rel="next"]', r: 'a[data-key="r"]', n: 'a[data-key="n"]' }[event.key];
  var link = selector && document.querySelector(selector);
  if (link) {
    event.preventDefault();
    link.click();
  }
});
