// "use <automatic name>" on a feature page, and "use its label" beside a labelled feature of another SAE
// at the site: copies the text (and a category, when the button names one) into the page's label editor
// and focuses it. Nothing is saved until the researcher saves. Delegated, so it survives htmx swaps.
document.addEventListener("click", function (event) {
  var button = event.target.closest && event.target.closest("[data-fill-label]");
  var form = button && (button.form || document.querySelector("form.label-form"));
  var text = form && form.querySelector("textarea[name=text]");
  if (!text) return;
  text.value = button.getAttribute("data-fill-label");
  var category = button.getAttribute("data-fill-category");
  var select = form.querySelector("select[name=category]");
  if (category && select) select.value = category;
  text.focus();
});
