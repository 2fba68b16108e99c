-- gptoss commands; nothing loads until one is first used
if vim.g.loaded_gptoss then return end
vim.g.loaded_gptoss = true

local function cmd(name, method, opts)
  vim.api.nvim_create_user_command(name, function(a) require("gptoss.nvim")[method](a) end, opts)
end
cmd("GptossChat", "chat_command", { nargs = "*", complete = "file", desc = "gptoss: open a chat, or send its message" })
cmd("GptossStop", "stop_command", { nargs = 0, desc = "gptoss: stop every request" })
cmd("GptossAsk", "ask_command", { nargs = "+", range = true, desc = "gptoss: ask about the range" })
cmd("GptossRewrite", "rewrite_command", { nargs = "+", range = true, desc = "gptoss: rewrite the range" })
cmd("GptossAccept", "accept_command", { nargs = 0, desc = "gptoss: apply the rewrite" })
cmd("GptossReject", "reject_command", { nargs = 0, desc = "gptoss: drop the rewrite" })
cmd("GptossAdapter", "adapter_command", { nargs = "?", desc = "gptoss: switch the adapter",
  complete = function(lead) return require("gptoss.nvim").complete_adapter(lead) end })
cmd("GptossSave", "save_command", { nargs = 1, complete = "file", desc = "gptoss: save the chat" })
