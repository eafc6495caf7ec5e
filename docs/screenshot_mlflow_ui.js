// Makes docs/mlflow-ui-test-accuracy-vs-updates.png: in the MLflow UI's chart view of an experiment,
// adds a line chart of test_accuracy with the metric 'updates' as its x-axis, and takes a screenshot.
// Needs Node.js, 'npm install playwright-core' and Debian's chromium; the UI running, e.g.
//   .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5055
//   node docs/screenshot_mlflow_ui.js 'http://127.0.0.1:5055/#/experiments/1/runs?compareRunsMode=CHART' out.png
// (made with MLflow 3.17.2's UI; its markup may change with other versions).
const { chromium } = require('playwright-core');
const fs = require('fs');
(async () => {
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'] });
  const page = await browser.newPage({ viewport: { width: 1500, height: 950 } });
  await page.goto(process.argv[2], { waitUntil: 'load', timeout: 60000 });
  await page.waitForTimeout(9000);
  await page.getByRole('button', { name: 'Add chart' }).first().click();
  await page.waitForTimeout(1500);
  await page.getByRole('menuitem', { name: 'Line chart' }).click();
  await page.waitForTimeout(2000);
  const dialog = page.getByRole('dialog');
  await dialog.locator('input[value=metric]').check({ force: true });
  await page.waitForTimeout(500);
  await dialog.getByText('Select metric').click({ force: true });
  await page.waitForTimeout(800);
  await page.keyboard.type('updates');
  await page.waitForTimeout(600);
  await page.keyboard.press('Enter');
  await page.waitForTimeout(800);
  // y-axis: replace batch_size by test_accuracy
  await dialog.locator('.du-bois-light-select-selection-item-remove').first().click({ force: true });
  await page.waitForTimeout(400);
  const yselect = dialog.locator('.du-bois-light-select-selector').last();
  await yselect.click({ force: true });
  await page.keyboard.type('test_accuracy');
  await page.waitForTimeout(600);
  await page.keyboard.press('Enter');
  await page.keyboard.press('Escape').catch(() => {});
  await page.waitForTimeout(1000);
  await page.waitForTimeout(4000);
  await dialog.getByRole('button', { name: 'Add chart' }).click();
  await page.waitForTimeout(1500);
  const assistantClose = page.getByRole('button', { name: 'Close' });
  if (await assistantClose.count()) { try { await assistantClose.last().click({ timeout: 2000 }); } catch (e) {} }
  await page.getByPlaceholder('Search metric charts').fill('test_accuracy');
  await page.waitForTimeout(8000);
  await page.screenshot({ path: process.argv[3] || 'mlflow-ui.png', clip: { x: 200, y: 0, width: 960, height: 660 } });
  await browser.close();
})();
