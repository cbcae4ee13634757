// "use <automatic name>" on a feature page: copies the name into the label editor's text field and
// focuses it. Nothing is saved until the researcher saves. Delegated, so it survives htmx swaps.
document.addEventListener("click", function (event) {
  var button = event.target.closest && event.target.closest("[data-fill-label]");
  var text = button && button.form && button.form.querySelector("textarea[name=text]");
  if (!text) return;
  text.value = button.getAttribute("data-fill-label");
  text.focus();
});
